"""SwiGLU feed-forward module: fc2(silu(fc1(x)) * fc3(x)), as in AIMv2."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.swiglu import swiglu


class SwiGLU(nn.Module):
    """SwiGLU FFN with separate gate (fc1), up (fc3) and down (fc2) projections.

    State-dict keys are stable and match the released AIMv2 checkpoints: `fc1.weight` (hidden, dim),
    `fc3.weight` (hidden, dim), `fc2.weight` (dim, hidden), plus `.bias` entries when bias=True.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, **factory)  # gate
        self.fc3 = nn.Linear(dim, hidden_dim, bias=bias, **factory)  # up
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, **factory)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(swiglu(self.fc1(x), self.fc3(x)))
