"""SwiGLU feed-forward module: fc2(silu(fc1(x)) * fc3(x)), as in AIMv2."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.swiglu import swiglu, swiglu_packed


class SwiGLU(nn.Module):
    """SwiGLU FFN with gate (fc1), up (fc3) and down (fc2) projections.

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
        if not (_plain(self.fc1) and _plain(self.fc3)):  # hooks (offloading, LoRA, ...) must still run
            return self.fc2(swiglu(self.fc1(x), self.fc3(x)))
        # Gate and up as one GEMM over the stacked weights (2 * hidden, dim) feeding swiglu_packed:
        # one launch instead of two, and x's gradient leaves one GEMM instead of two GEMMs and their
        # sum. The stacking copies the weights (2 * hidden * dim), far less than the (tokens, hidden)
        # activations it saves a pass over; the parameters, their keys and checkpoints stay as they are.
        weight = torch.cat((self.fc1.weight, self.fc3.weight))
        bias = None if self.fc1.bias is None else torch.cat((self.fc1.bias, self.fc3.bias))
        return self.fc2(swiglu_packed(F.linear(x, weight, bias)))


def _plain(linear: nn.Linear) -> bool:
    """A Linear whose call is exactly F.linear with its own parameters: no hooks on it and no forward
    replaced on the instance (as accelerate's offloading does), so reading its weight directly skips
    nothing."""
    return not (linear._forward_pre_hooks or linear._forward_hooks or "forward" in vars(linear))
