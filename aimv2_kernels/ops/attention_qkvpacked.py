"""Prefix-causal attention on the packed output of one qkv projection, (B, S, 3, H, D).

The same kernels as `prefix_causal_attention` run on the three (B, H, S, D) views of qkv. What the
packed op adds is the backward: it writes d qkv in the (B, S, 3, H, D) layout directly, so the
gradient of the projection's output is one buffer the kernels fill, with no `torch.stack` of three
gradients (the copy autograd makes when a model unbinds qkv itself: B * S * 3 * H * D elements per
layer and step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve
from ..validation import attention_scale, check_head_dim, check_last_dim_contiguous, check_tensor
from ..layouts import empty_bshd_output
from .attention import _prefix_tensor, check_prefix
from .autograd import call, register_autograd


def _views(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, S, 3, H, D) -> q, k, v as (B, H, S, D) views, no copy."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def _attention_qkvpacked(qkv: Tensor, prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (B, S, H, D) contiguous, lse (B, H, S) float32)."""
    if prefix_len is not None:
        check_prefix(prefix_len)
    q, k, v = _views(qkv)
    out, lse = resolve("attention_fwd", qkv.device, q)[1](q, k, v, prefix_len, causal, scale)
    return out.transpose(1, 2), lse  # the kernels' (B, H, S, D) view of (B, S, H, D) memory, as (B, S, H, D)


qkvpacked_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_qkvpacked",
                                       mutates_args=())(_attention_qkvpacked)


@qkvpacked_op.register_fake
def _(qkv, prefix_len, causal, scale):
    q = _views(qkv)[0]
    lse_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return empty_bshd_output(q).transpose(1, 2), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _qkvpacked_backward_body(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, prefix_len: Optional[Tensor],
                             causal: bool, scale: float) -> Tensor:
    """dout, out (B, S, H, D) -> d qkv (B, S, 3, H, D), contiguous, written by the backward kernels."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = _views(qkv)
    resolve("attention_bwd", qkv.device, q)[1](dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, prefix_len,
                                               causal, scale, _views(dqkv))
    return dqkv


qkvpacked_backward_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_qkvpacked_backward",
                                                mutates_args=())(_qkvpacked_backward_body)


@qkvpacked_backward_op.register_fake
def _(dout, qkv, out, lse, prefix_len, causal, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup(ctx, inputs, output):
    qkv, prefix_len, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(qkv, prefix_len, output[0], output[1])


def _backward(ctx, dout, _dlse):
    if dout is None:  # only lse was used
        return None, None, None, None
    qkv, prefix_len, out, lse = ctx.saved_tensors
    dqkv = call(qkvpacked_backward_op, _qkvpacked_backward_body, dout, qkv, out, lse, prefix_len, ctx.causal, ctx.scale)
    return dqkv, None, None, None


_qkvpacked_call = register_autograd(qkvpacked_op, _attention_qkvpacked, _backward, _setup)


def prefix_causal_attention_qkvpacked(qkv: Tensor, prefix_len=None, *, causal: bool = True,
                                      scale: float | None = None) -> Tensor:
    """`prefix_causal_attention` of the q, k, v packed in qkv (B, S, 3, H, D) (one fused projection's
    output viewed as such; any strides with a contiguous last dim). Returns (B, S, H, D); the backward
    writes the gradient of qkv in its (B, S, 3, H, D) layout, with no stack of three gradients."""
    check_tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, S, 3, H, D), got {tuple(qkv.shape)}")
    check_last_dim_contiguous("qkv", qkv)
    check_head_dim("qkv", qkv.shape[-1])
    if qkv.shape[1] == 0:
        raise ValueError(f"qkv must have at least one position (S >= 1), got shape {tuple(qkv.shape)}")
    scale = attention_scale(causal, scale, qkv.shape[-1])
    prefix = _prefix_tensor(prefix_len, qkv.shape[0], qkv.device)
    return _qkvpacked_call(qkv, prefix if causal else None, causal, scale)[0]
