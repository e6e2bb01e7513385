"""The "torch" backend's SwiGLU, separate and packed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import register
from ..casts import as_dtype as _as


_WIDE = (torch.float32, torch.float64)  # computed in their own dtype; others in float32


def _swiglu_grads(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """d/dgate silu(g) * u = u * sig(g) * (1 + g * (1 - sig(g))), which is aten's silu_backward of
    dout * u; d/dup = silu(g). In float32/64, returned in the inputs' dtypes."""
    cdt = torch.float64 if gate.dtype == torch.float64 else torch.float32
    if gate.dtype == cdt and up.dtype == cdt and dout.dtype == cdt:  # no casts to pay for
        return torch.ops.aten.silu_backward(dout * up, gate), dout * F.silu(gate)
    g, u, d = _as(gate, cdt), _as(up, cdt), _as(dout, cdt)
    dgate = torch.ops.aten.silu_backward(d * u, g)
    dup = d * F.silu(g)
    return _as(dgate, gate.dtype), _as(dup, up.dtype)


@register("swiglu_fwd", "torch")
def _swiglu_fwd_torch(gate: Tensor, up: Tensor) -> Tensor:
    """reference.swiglu's math: silu(gate) * up in float32/64."""
    if gate.dtype in _WIDE and up.dtype == gate.dtype:
        return F.silu(gate).mul_(up).contiguous()
    return _as(F.silu(_as(gate, torch.float32)).mul_(_as(up, torch.float32)), gate.dtype).contiguous()


@register("swiglu_bwd", "torch")
def _swiglu_bwd_torch(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = _swiglu_grads(dout, gate, up)
    return dgate.contiguous(), dup.contiguous()


@register("swiglu_packed_fwd", "torch")
def _swiglu_packed_fwd_torch(x: Tensor) -> Tensor:
    return _swiglu_fwd_torch(*x.chunk(2, dim=-1))


@register("swiglu_packed_bwd", "torch")
def _swiglu_packed_bwd_torch(dout: Tensor, x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.cat(_swiglu_grads(dout, gate, up), dim=-1)
