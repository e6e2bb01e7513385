"""SwiGLU (silu(gate) * up), separate and packed, as custom ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import resolve
from .autograd import call, register_autograd
from ..validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_shape, check_tensor


# ---- custom ops ----------------------------------------------------------------------------------
# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return resolve("swiglu_fwd", gate.device, gate)[1](gate, up)


swiglu_op = torch.library.custom_op("aimv2_kernels::swiglu", mutates_args=())(_swiglu)


@swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _swiglu_backward_body(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return resolve("swiglu_bwd", gate.device, gate)[1](dout, gate, up)


swiglu_backward_op = torch.library.custom_op("aimv2_kernels::swiglu_backward", mutates_args=())(_swiglu_backward_body)


@swiglu_backward_op.register_fake
def _(dout, gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(up, memory_format=torch.contiguous_format)


def _swiglu_packed(x: Tensor) -> Tensor:
    return resolve("swiglu_packed_fwd", x.device, x)[1](x)


swiglu_packed_op = torch.library.custom_op("aimv2_kernels::swiglu_packed", mutates_args=())(_swiglu_packed)


@swiglu_packed_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _swiglu_packed_backward_body(dout: Tensor, x: Tensor) -> Tensor:
    return resolve("swiglu_packed_bwd", x.device, x)[1](dout, x)


swiglu_packed_backward_op = torch.library.custom_op("aimv2_kernels::swiglu_packed_backward",
                                                    mutates_args=())(_swiglu_packed_backward_body)


@swiglu_packed_backward_op.register_fake
def _(dout, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dout):
    if dout is None:  # gradients are not materialized (see autograd.py): nothing flows back
        return None, None
    gate, up = ctx.saved_tensors
    return call(swiglu_backward_op, _swiglu_backward_body, dout, gate, up)


def _swiglu_packed_backward(ctx, dout):
    if dout is None:
        return None
    (x,) = ctx.saved_tensors
    return call(swiglu_packed_backward_op, _swiglu_packed_backward_body, dout, x)


_swiglu_call = register_autograd(swiglu_op, _swiglu, _swiglu_backward, _setup_swiglu)
_swiglu_packed_call = register_autograd(swiglu_packed_op, _swiglu_packed, _swiglu_packed_backward, _setup_swiglu)


# ---- functional API ------------------------------------------------------------------------------

def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; gate and up of the same shape, dtype and device."""
    if not (isinstance(gate, Tensor) and isinstance(up, Tensor) and gate.shape == up.shape and gate.dim() >= 1
            and gate.dtype == up.dtype and gate.dtype in FLOAT_DTYPES and gate.device == up.device):
        _check_swiglu_inputs(gate, up)  # something is off: raises the error that names it
    return _swiglu_call(gate, up)


def _check_swiglu_inputs(gate, up) -> None:
    check_tensor("gate", gate, min_ndim=1)
    check_tensor("up", up, min_ndim=1)
    check_shape("up", up, tuple(gate.shape), "the shape of gate")
    check_same_device("gate", gate, up=up)
    check_same_dtype("gate", gate, up=up)


def swiglu_packed(x: Tensor) -> Tensor:
    """silu(x[..., :H]) * x[..., H:] with 2H = x.shape[-1] (one GEMM made both halves)."""
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (gate and up halves), got shape {tuple(x.shape)}")
    return _swiglu_packed_call(x)
