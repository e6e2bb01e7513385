"""RMSNorm and fused residual-add RMSNorm as custom ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve
from ..casts import as_dtype as _as
from .autograd import call, register_autograd
from ..validation import FLOAT_DTYPES, check_positive_float, check_same_device, check_shape, check_tensor

# ---- custom ops ----------------------------------------------------------------------------------
# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    return resolve("rms_norm_fwd", x.device, x)[1](x, weight, eps)


rms_norm_op = torch.library.custom_op("aimv2_kernels::rms_norm", mutates_args=())(_rms_norm)


@rms_norm_op.register_fake
def _(x, weight, eps):
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=cdt)


def _rms_norm_residual(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (normalized x + residual in x's dtype, x + residual in residual's dtype, rstd)."""
    return resolve("rms_norm_residual_fwd", x.device, x)[1](x, residual, weight, eps)


rms_norm_residual_op = torch.library.custom_op("aimv2_kernels::rms_norm_residual", mutates_args=())(_rms_norm_residual)


@rms_norm_residual_op.register_fake
def _(x, residual, weight, eps):
    # y in the update's dtype, the stream (and so rstd's precision) in the residual's: see the torch kernel
    cdt = torch.float64 if residual.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    stream = torch.empty_like(residual, memory_format=torch.contiguous_format)
    return y, stream, x.new_empty(x.shape[:-1], dtype=cdt)


def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dresidual: Optional[Tensor],
                       narrow_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx (+ dresidual when given), dweight or an empty tensor when weight is None, dx in
    narrow_dtype or an empty tensor when it is None), the last written by the same kernel."""
    # narrow_dtype has a default in the schema too: inductor's generated calls leave out trailing
    # arguments that are None, which a schema without the default rejects
    return resolve("rms_norm_bwd", x.device, x)[1](dy, x, weight, rstd, dresidual, narrow_dtype)


rms_norm_backward_op = torch.library.custom_op("aimv2_kernels::rms_norm_backward", mutates_args=())(_rms_norm_backward)


@rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dresidual, narrow_dtype=None):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dx_narrow = x.new_empty(x.shape, dtype=narrow_dtype) if narrow_dtype is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, dx_narrow


def _setup_norm(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1])


def _norm_backward(ctx, dy, _drstd):
    if dy is None:  # only rstd was used (gradients are not materialized: see autograd.py)
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dw, _ = call(rms_norm_backward_op, _rms_norm_backward, dy, x, weight, rstd, None, None)
    return dx, (dw if weight is not None else None), None


def _setup_norm_residual(ctx, inputs, output):
    weight = inputs[2]
    ctx.update_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1], weight, output[2])


def _norm_residual_backward(ctx, dy, dstream, _drstd):
    """x and residual get the same gradient (both are added into the stream): computed once in the
    stream's dtype for the residual and, by the same kernel, rounded to x's dtype for x when that is
    narrower (a bf16 update of a float32 stream; the same tensor when they agree).
    dy or dstream is None when that output was not used (no zero tensor is made for it)."""
    if dy is None:  # y unused: the stream's gradient passes straight to both inputs
        if dstream is None:
            return None, None, None, None
        return _as(dstream, ctx.update_dtype), dstream, None, None
    stream, weight, rstd = ctx.saved_tensors
    narrow = ctx.update_dtype if ctx.update_dtype != stream.dtype else None
    dresidual, dw, dx_narrow = call(rms_norm_backward_op, _rms_norm_backward, dy, stream, weight, rstd, dstream, narrow)
    return (dx_narrow if narrow is not None else dresidual), dresidual, (dw if weight is not None else None), None


_rms_norm_call = register_autograd(rms_norm_op, _rms_norm, _norm_backward, _setup_norm)
_rms_norm_residual_call = register_autograd(rms_norm_residual_op, _rms_norm_residual, _norm_residual_backward,
                                            _setup_norm_residual)


# ---- functional API ------------------------------------------------------------------------------

def _norm_inputs_ok(x, weight, eps) -> bool:
    """The common case in one expression (this runs on every call); anything else goes through
    `_check_norm_inputs`, which raises the error that names the problem."""
    return (isinstance(x, Tensor) and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and type(eps) is float and eps > 0
            and (weight is None or (isinstance(weight, Tensor) and weight.dtype in FLOAT_DTYPES and weight.dim() == 1
                                    and weight.shape[0] == x.shape[-1] and weight.device == x.device)))


def _check_norm_inputs(x: Tensor, weight: Optional[Tensor], eps) -> float:
    check_tensor("x", x, min_ndim=1)
    if weight is not None:
        check_tensor("weight", weight, ndim=1)
        check_shape("weight", weight, (x.shape[-1],), "the last dim of x")
        check_same_device("x", x, weight=weight)
    return check_positive_float("eps", eps)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dim of x (any leading dims); weight (x.shape[-1],) or None.

    Computed in float32 and returned in x's dtype; weight may have another float dtype (an fp32
    parameter under bf16 autocast) and its gradient comes back in weight's dtype.
    """
    if not _norm_inputs_ok(x, weight, eps):
        eps = _check_norm_inputs(x, weight, eps)
    return _rms_norm_call(x, weight, eps)[0]


_STREAM_WIDER_THAN = (torch.float16, torch.bfloat16)  # updates that may go into a float32 stream


def _check_stream_dtype(x: Tensor, residual: Tensor) -> None:
    """residual has x's dtype, or is a float32 stream taking a 16-bit update."""
    if residual.dtype == x.dtype or (residual.dtype == torch.float32 and x.dtype in _STREAM_WIDER_THAN):
        return
    name = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
    raise TypeError(f"residual has dtype {name(residual)} but x has {name(x)}; expected x's dtype, or float32 "
                    f"(a residual stream wider than the update) when x is float16 or bfloat16")


def rms_norm_residual(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: a pre-norm block's add-then-normalize.

    x is the update (e.g. an attention or MLP output), residual the stream it joins; same shape.
    Dtypes: residual has x's dtype, or is float32 while x is float16/bfloat16 (the residual-in-fp32
    design: under bf16 autocast the stream stays float32 while the matmul outputs are bf16). The add
    is done in float32, the stream comes back in the residual's dtype and y in x's dtype. Gradients
    come back in the dtype of their input (dx, dresidual, dweight).
    """
    if not (_norm_inputs_ok(x, weight, eps) and isinstance(residual, Tensor) and residual.shape == x.shape
            and residual.device == x.device
            and (residual.dtype == x.dtype or (residual.dtype == torch.float32 and x.dtype in _STREAM_WIDER_THAN))):
        eps = _check_norm_inputs(x, weight, eps)
        check_tensor("residual", residual)
        check_shape("residual", residual, tuple(x.shape), "the shape of x")
        check_same_device("x", x, residual=residual)
        _check_stream_dtype(x, residual)
    y, stream, _ = _rms_norm_residual_call(x, residual, weight, eps)
    return y, stream
