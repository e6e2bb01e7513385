"""Helpers shared by the Triton launchers: strided row addressing, device context, SM count, warnings.

Row-wise ops (RMSNorm, SwiGLU) see a tensor as rows of its last dim. To avoid copying views such as `x[:, :-1]` of a
(B, S, D) tensor, a launcher describes the leading dims by up to three (size, stride) levels and the
kernel turns a flat row index into an element offset with `row_offsets`. Leading dims that are laid
out back to back are merged first, so a contiguous tensor of any rank is one level and pays no
division in the kernel; a copy is made only when the last dim is strided or more than three levels
remain after merging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings

import torch
import triton
import triton.language as tl

MAX_ROW_LEVELS = 3


@triton.jit
def row_offsets(rows, N1, N2, S0, S1, S2, ROW_LEVELS: tl.constexpr):
    """int64 element offsets of flat row indices `rows` (int32, any shape).

    The leading dims are (n0, N1, N2) with element strides (S0, S1, S2); with ROW_LEVELS < 3 only the
    innermost levels are used. Division stays in int32 (row counts fit), offsets are int64.
    """
    if ROW_LEVELS == 1:
        offsets = rows.to(tl.int64) * S2
    elif ROW_LEVELS == 2:
        offsets = (rows // N2).to(tl.int64) * S1 + (rows % N2).to(tl.int64) * S2
    else:
        outer = rows // N2
        offsets = (outer // N1).to(tl.int64) * S0 + (outer % N1).to(tl.int64) * S1 + (rows % N2).to(tl.int64) * S2
    return offsets


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Leading-dim description shared by several same-shape tensors, in `row_offsets` terms."""

    n_rows: int
    sizes: tuple[int, int]  # (N1, N2)
    strides: tuple[tuple[int, int, int], ...]  # per tensor: (S0, S1, S2)
    levels: int  # ROW_LEVELS, 1..3


def _merged_levels(tensors: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
    """Leading dims as [(size, [stride per tensor])], size-1 dims dropped, adjacent dims merged when
    every tensor has them back to back (outer stride == inner stride * inner size)."""
    levels: list[tuple[int, list[int]]] = []
    for dim in range(tensors[0].dim() - 1):
        size = tensors[0].shape[dim]
        if size == 1:
            continue
        strides = [t.stride(dim) for t in tensors]
        if levels:
            outer_size, outer_strides = levels[-1]
            if all(o == s * size for o, s in zip(outer_strides, strides)):
                levels[-1] = (outer_size * size, strides)
                continue
        levels.append((size, strides))
    return levels


# (shape, strides of each tensor) -> layout, for tensors read in place (no copy needed). Launchers
# see the same few shapes on every step; the Python walk over dims runs once per shape.
_layouts: dict[tuple, RowLayout] = {}


def row_layout(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], RowLayout]:
    """Describe the rows of same-shape tensors for a kernel; returns the tensors (copied only when
    unavoidable: a strided last dim, or more than three unmergeable leading levels) and the layout."""
    key = (tensors[0].shape, *(t.stride() for t in tensors))
    layout = _layouts.get(key)
    if layout is not None:
        return list(tensors), layout
    ts, layout = _row_layout(tensors)
    if all(a is b for a, b in zip(ts, tensors)) and len(_layouts) < 1024:  # bounded: shapes of one run
        _layouts[key] = layout
    return ts, layout


def _row_layout(tensors) -> tuple[list[torch.Tensor], RowLayout]:
    ts = list(tensors)
    if ts[0].shape[-1] > 1:
        ts = [t if t.stride(-1) == 1 else t.contiguous() for t in ts]
    levels = _merged_levels(ts)
    if len(levels) > MAX_ROW_LEVELS:
        ts = [t.contiguous() for t in ts]
        levels = _merged_levels(ts)
    if not levels:  # a single row
        levels = [(1, [0] * len(ts))]
    padded = [(1, [0] * len(ts))] * (MAX_ROW_LEVELS - len(levels)) + levels
    sizes = (padded[1][0], padded[2][0])
    strides = tuple((padded[0][1][i], padded[1][1][i], padded[2][1][i]) for i in range(len(ts)))
    n_rows = math.prod(size for size, _ in levels)
    return ts, RowLayout(n_rows, sizes, strides, len(levels))


_NO_CONTEXT = contextlib.nullcontext()


def device_context(t: torch.Tensor):
    """Launch on `t`'s GPU (Triton launches on the current device); nothing to do on the CPU or when
    it already is the current device (the usual case: entering torch.cuda.device costs a few us)."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return _NO_CONTEXT
    return torch.cuda.device(t.device)


# Plain-Python twins of triton.cdiv and triton.next_power_of_2 for launchers: called from the host,
# triton's versions go through its constexpr-function machinery, about 10x slower per call, and a
# launcher makes several such calls on every launch.

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; a small fixed number for the interpreter on the CPU."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A warning shown once per process for each `key` (a fallback taken in a hot loop)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- test hook: poisoned outputs -----------------------------------------------------------------

_poison_outputs = False


def poison(*tensors: torch.Tensor | None) -> None:
    """Fill freshly allocated float output buffers with NaN when a test asked for it (`poisoned_outputs`),
    so that any element a kernel fails to write shows up as NaN instead of stale memory that happens
    to look right. The launchers call this right after allocating their outputs; a no-op otherwise."""
    if not _poison_outputs:
        return
    for t in tensors:
        if t is not None and t.is_floating_point() and t.numel() > 0:
            t.fill_(float("nan"))


@contextlib.contextmanager
def poisoned_outputs():
    """Within the block every Triton launcher's output buffers start as NaN (tests only)."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, True
    try:
        yield
    finally:
        _poison_outputs = previous
