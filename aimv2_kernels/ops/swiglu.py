"""SwiGLU (silu(gate) * up), separate and packed, as custom ops."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as ref
from ..backend import register, resolve
from .autograd import register_autograd
from ..validation import check_same_device, check_same_dtype, check_shape, check_tensor


# ---- "torch" backend -----------------------------------------------------------------------------

def _swiglu_grads(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """d/dgate silu(g) * u = u * sig(g) * (1 + g * (1 - sig(g))); d/dup = silu(g). In float32/64."""
    cdt = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u, d = gate.to(cdt), up.to(cdt), dout.to(cdt)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    dup = d * g * sig
    return dgate.to(gate.dtype), dup.to(up.dtype)


@register("swiglu_fwd", "torch")
def _swiglu_fwd_torch(gate: Tensor, up: Tensor) -> Tensor:
    return ref.swiglu(gate, up).contiguous()


@register("swiglu_bwd", "torch")
def _swiglu_bwd_torch(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    dgate, dup = _swiglu_grads(dout, gate, up)
    return dgate.contiguous(), dup.contiguous()


@register("swiglu_packed_fwd", "torch")
def _swiglu_packed_fwd_torch(x: Tensor) -> Tensor:
    return ref.swiglu_packed(x).contiguous()


@register("swiglu_packed_bwd", "torch")
def _swiglu_packed_bwd_torch(dout: Tensor, x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.cat(_swiglu_grads(dout, gate, up), dim=-1)


# ---- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("aimv2_kernels::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return resolve("swiglu_fwd", gate.device)[1](gate, up)


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("aimv2_kernels::swiglu_backward", mutates_args=())
def swiglu_backward_op(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return resolve("swiglu_bwd", gate.device)[1](dout, gate, up)


@swiglu_backward_op.register_fake
def _(dout, gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(up, memory_format=torch.contiguous_format)


@torch.library.custom_op("aimv2_kernels::swiglu_packed", mutates_args=())
def swiglu_packed_op(x: Tensor) -> Tensor:
    return resolve("swiglu_packed_fwd", x.device)[1](x)


@swiglu_packed_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("aimv2_kernels::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward_op(dout: Tensor, x: Tensor) -> Tensor:
    return resolve("swiglu_packed_bwd", x.device)[1](dout, x)


@swiglu_packed_backward_op.register_fake
def _(dout, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return swiglu_backward_op(dout, gate, up)


def _swiglu_packed_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return swiglu_packed_backward_op(dout, x)


register_autograd(swiglu_op, _swiglu_backward, _setup_swiglu)
register_autograd(swiglu_packed_op, _swiglu_packed_backward, _setup_swiglu)


# ---- functional API ------------------------------------------------------------------------------

def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; gate and up of the same shape, dtype and device."""
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up, min_ndim=1)
    check_shape("up", up, tuple(gate.shape), "the shape of gate")
    check_same_device("gate", gate, up=up)
    check_same_dtype("gate", gate, up=up)
    return swiglu_op(gate, up)


def swiglu_packed(x: Tensor) -> Tensor:
    """silu(x[..., :H]) * x[..., H:] with 2H = x.shape[-1] (one GEMM made both halves)."""
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (gate and up halves), got shape {tuple(x.shape)}")
    return swiglu_packed_op(x)
