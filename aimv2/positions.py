"""2-D sinusoidal position embeddings of native-resolution AIMv2 (transformers' `is_native` model).

A patch at (row, col) of its image's grid gets a dim-vector of four quarters,
[sin(col * w) | cos(col * w) | sin(row * w) | cos(row * w)], with frequencies
w_k = 10000 ** (-k / (dim / 4)), k = 0 .. dim/4 - 1. The column half comes first: the released
native checkpoints were trained with this half-swapped layout (ViT-MAE's naming convention), and
transformers builds it the same way, so weights move between the two without change.

Nothing is learned, so images of any grid share one definition. Each half depends on one coordinate
only, so the embedding is two rows of one small table, computed in float64 and rounded once, as
transformers does.
"""
from __future__ import annotations

import torch
from torch import Tensor

TEMPERATURE = 10000.0


def sincos_table(positions: int, dim: int, device=None) -> Tensor:
    """(positions, dim // 2) float64: row x is [sin(x * w) | cos(x * w)] over the dim // 4 frequencies."""
    if dim % 4:
        raise ValueError(f"the 2-D sinusoidal embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (dim/4,)
    angles = torch.arange(positions, dtype=torch.float64, device=device).outer(omega)  # (positions, dim/4)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(rows: Tensor, cols: Tensor, extent: int, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(T,) int row and column of each patch, all below the host int `extent` (so no device value
    is read back) -> (T, dim) embeddings on their device, in `dtype`."""
    table = sincos_table(extent, dim, device=rows.device)  # (extent, dim/2)
    return torch.cat([table[cols], table[rows]], dim=1).to(dtype)


def sincos_grid(height: int, width: int, dim: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """(height * width, dim) embeddings of one grid in row-major patch order."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return sincos_2d(rows, cols, max(height, width), dim, dtype)
