"""The AIMv2 losses as custom ops: norm-pix patch MSE, linear cross-entropy, and their sum."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..backend import resolve
from .autograd import call, register_autograd
from ..validation import INDEX_DTYPES, check_positive_float, check_same_device, check_same_dtype, check_shape, check_tensor
from ..linear_ce_chunks import stored_grad_dtype


class AIMv2Loss(NamedTuple):
    """total = alpha * pixel + text; each a float32 scalar tensor."""

    total: Tensor
    pixel: Tensor
    text: Tensor


def _cdt(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- custom ops ----------------------------------------------------------------------------------

# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _patch_mse(pred: Tensor, target: Tensor, mask: Optional[Tensor], norm_pix: bool, eps: float) -> Tensor:
    return resolve("patch_mse_fwd", pred.device, pred)[1](pred, target, mask, norm_pix, eps)


patch_mse_op = torch.library.custom_op("aimv2_kernels::patch_mse_loss", mutates_args=())(_patch_mse)


@patch_mse_op.register_fake
def _(pred, target, mask, norm_pix, eps):
    return pred.new_empty((), dtype=_cdt(pred))


def _patch_mse_backward_body(dloss: Tensor, pred: Tensor, target: Tensor, mask: Optional[Tensor], norm_pix: bool,
                             eps: float) -> Tensor:
    return resolve("patch_mse_bwd", pred.device, pred)[1](dloss, pred, target, mask, norm_pix, eps)


patch_mse_backward_op = torch.library.custom_op("aimv2_kernels::patch_mse_loss_backward",
                                                mutates_args=())(_patch_mse_backward_body)


@patch_mse_backward_op.register_fake
def _(dloss, pred, target, mask, norm_pix, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_patch_mse(ctx, inputs, output):
    pred, target, mask, norm_pix, eps = inputs
    ctx.norm_pix, ctx.eps = norm_pix, eps
    ctx.save_for_backward(pred, target, mask)


def _patch_mse_backward(ctx, dloss):
    if dloss is None:  # gradients are not materialized (see autograd.py): nothing flows back
        return None, None, None, None, None
    pred, target, mask = ctx.saved_tensors
    dpred = call(patch_mse_backward_op, _patch_mse_backward_body, dloss, pred, target, mask, ctx.norm_pix, ctx.eps)
    return dpred, None, None, None, None


_patch_mse_call = register_autograd(patch_mse_op, _patch_mse, _patch_mse_backward, _setup_patch_mse)


def _check_label_values(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, vocab). Eager only: raises on the CPU, an asynchronous
    device assert on CUDA (no host sync)."""
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).any()
    if labels.device.type == "cuda":
        torch._assert_async(~bad, "labels must be ignore_index or in [0, vocab)")
    elif bool(bad):
        raise ValueError(f"labels must be ignore_index ({ignore_index}) or in [0, {vocab}), got values outside")


def _linear_ce(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int,
               grad_hidden: bool, grad_params: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (mean loss, dhidden, dweight, dbias), the gradients of the summed loss (d loss =
    n_counted) computed in the same pass (weight and bias when grad_params; empty tensors for those not
    asked for); the backward applies dloss / n_counted. Loss in float32 (float64 for float64 input);
    dhidden in hidden's dtype, dweight in stored_grad_dtype(weight.dtype), dbias in the loss's dtype."""
    _check_label_values(labels, weight.shape[0], ignore_index)
    return resolve("linear_ce", hidden.device, hidden)[1](hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params)


linear_ce_op = torch.library.custom_op("aimv2_kernels::linear_cross_entropy", mutates_args=())(_linear_ce)


@linear_ce_op.register_fake
def _(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params):
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else hidden.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=stored_grad_dtype(weight.dtype)) if grad_params else weight.new_empty(0)
    db = weight.new_empty(weight.shape[:1], dtype=_cdt(hidden)) if grad_params and bias is not None else weight.new_empty(0)
    return hidden.new_empty((), dtype=_cdt(hidden)), dh, dw, db


def _setup_linear_ce(ctx, inputs, output):
    _, _, labels, bias, ignore_index, grad_hidden, grad_params = inputs
    ctx.grad_hidden, ctx.grad_params, ctx.has_bias = grad_hidden, grad_params, bias is not None
    ctx.ignore_index = ignore_index
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.weight_dtype = inputs[1].dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(labels, *output[1:])


def _linear_ce_backward(ctx, dloss, *_):
    """The gradients of the summed loss were computed in the forward pass: scale them by dloss /
    n_counted (the one place that factor is applied, see linear_ce_chunks). Into new tensors, not in
    place: a backward may run more than once on one graph (retain_graph, gradcheck, opcheck), and each
    must see the stored gradients unscaled. They are constants to autograd, so a second derivative
    would be silently wrong: refuse it instead. The side outputs' gradients (*_) are None: no (T, D), (V, D) and (V,) zero
    tensors are made for them. On CUDA a 16-bit gradient is multiplied by the factor rounded to its
    dtype (as `grad * dloss` always was); the factor is at least 2^-14 unless dloss / n_counted is."""
    if dloss is None:
        return None, None, None, None, None, None, None
    labels, dh, dw, db = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise NotImplementedError("linear_cross_entropy does not support double backward (create_graph=True)")
    factor = dloss / (labels != ctx.ignore_index).sum().clamp_min(1).to(dloss.dtype)
    dhidden = dh * factor if ctx.grad_hidden else None
    # dW: scaled in its stored dtype (float32 for fp16 weights), then cast once if that differs.
    dweight = (dw * factor).to(ctx.weight_dtype) if ctx.grad_params else None
    dbias = (db * factor).to(ctx.bias_dtype) if ctx.grad_params and ctx.has_bias else None
    return dhidden, dweight, None, dbias, None, None, None


_linear_ce_call = register_autograd(linear_ce_op, _linear_ce, _linear_ce_backward, _setup_linear_ce)


# ---- functional API ------------------------------------------------------------------------------

def _check_patch_inputs(pred, target, mask, eps) -> float:
    check_tensor("pred", pred, ndim=3)
    check_tensor("target", target, ndim=3)
    check_shape("target", target, tuple(pred.shape), "the shape of pred: (B, N, P)")
    check_same_device("pred", pred, target=target, mask=mask)
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,), ndim=2)
        check_shape("mask", mask, tuple(pred.shape[:2]), "(B, N) of pred")
    if pred.shape[-1] < 2:
        raise ValueError(f"pred must have at least 2 values per patch (unbiased variance), got shape {tuple(pred.shape)}")
    return check_positive_float("eps", eps)


def patch_mse_loss(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None, *, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """Mean over counted patches of per-patch MSE between pred and the (norm-pix) target.

    pred, target (B, N, P), pred[:, i] predicting target[:, i]; mask bool (B, N), True = counted.
    Gradient flows to pred only. Returns a float32 scalar (0 when nothing is counted).
    """
    eps = _check_patch_inputs(pred, target, mask, eps)
    return _patch_mse_call(pred, target.detach(), mask, bool(norm_pix), eps)


def _check_ce_inputs(hidden, weight, labels, bias, ignore_index) -> None:
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("labels", labels, dtypes=INDEX_DTYPES)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, {hidden.shape[-1]}) to match hidden's last dim, got {tuple(weight.shape)}")
    check_shape("labels", labels, tuple(hidden.shape[:-1]), "hidden.shape[:-1]")
    check_same_device("hidden", hidden, weight=weight, labels=labels, bias=bias)
    check_same_dtype("hidden", hidden, weight=weight, bias=bias)
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],), "(V,)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of hidden @ weight.T (+ bias) over labels != ignore_index, in float32.

    hidden (..., D), weight (V, D), labels (...) int. Returns a float32 scalar (0 if all ignored).
    """
    _check_ce_inputs(hidden, weight, labels, bias, ignore_index)
    # Gradients come out of the forward pass, so ask only for those autograd will want.
    grad = torch.is_grad_enabled()
    grad_hidden = grad and hidden.requires_grad
    grad_params = grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
    return _linear_ce_call(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params)[0]


def aimv2_loss(pixel_pred: Tensor, patches: Tensor, patch_mask: Optional[Tensor], text_hidden: Tensor, text_weight: Tensor,
               labels: Tensor, *, alpha: float = 0.4, ignore_index: int = -100, norm_pix: bool = True, eps: float = 1e-6) -> AIMv2Loss:
    """AIMv2 objective: alpha * patch_mse_loss(pixel_pred, patches, patch_mask) + linear_cross_entropy(...)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
    pixel = patch_mse_loss(pixel_pred, patches, patch_mask, norm_pix=norm_pix, eps=eps)
    text = linear_cross_entropy(text_hidden, text_weight, labels, ignore_index=ignore_index)
    return AIMv2Loss(alpha * pixel + text, pixel, text)
