"""RMSNorm module: a drop-in for torch.nn.RMSNorm."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import rms_norm


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm over the last dim: same constructor arguments and `weight` key.

    normalized_shape must describe one dim (an int or a 1-tuple). As in torch.nn.RMSNorm, eps=None
    (the default) means the machine epsilon of the input's dtype; AIMv2 models pass eps=1e-5.
    """

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"normalized_shape must be one dim (int or 1-tuple), got {normalized_shape!r}")
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        return rms_norm(x, self.weight, eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
