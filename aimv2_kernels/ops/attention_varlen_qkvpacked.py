"""Prefix-causal attention over packed variable-length sequences, on the packed output of one qkv
projection, (T, 3, H, D) (FlashAttention's `flash_attn_varlen_qkvpacked_func` convention).

The same kernels as `prefix_causal_attention_varlen` run on the three (T, H, D) views of qkv. What
the packed op adds is the backward: it writes d qkv in the (T, 3, H, D) layout directly, so the
gradient of the projection's output is one buffer the kernels fill, with no `torch.stack` of three
gradients (the copy autograd makes when a model unbinds qkv itself: T * 3 * H * D elements per layer
and step).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve
from ..validation import (
    attention_scale,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_head_dim,
    check_last_dim_contiguous,
    check_max_seqlen,
    check_tensor,
    prefix_tensor,
)
from .attention import check_prefix
from .attention_varlen import _lse_dtype
from .autograd import call, register_autograd


def _views(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(T, 3, H, D) -> q, k, v as (T, H, D) views, no copy."""
    return qkv.unbind(1)


def _attention_varlen_qkvpacked(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, prefix_len: Optional[Tensor],
                                causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (T, H, D) contiguous, lse (H, T) float32, float64 for float64 inputs)."""
    check_cu_seqlens_values(cu_seqlens, qkv.shape[0], max_seqlen)
    if prefix_len is not None:
        check_prefix(prefix_len)
    q, k, v = _views(qkv)
    return resolve("attention_varlen_fwd", qkv.device, q)[1](q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)


varlen_qkvpacked_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_varlen_qkvpacked",
                                              mutates_args=())(_attention_varlen_qkvpacked)


@varlen_qkvpacked_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    T, _, H, D = qkv.shape
    return qkv.new_empty(T, H, D), qkv.new_empty(H, T, dtype=_lse_dtype(qkv))


def _varlen_qkvpacked_backward_body(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                                    max_seqlen: int, prefix_len: Optional[Tensor], causal: bool,
                                    scale: float) -> Tensor:
    """dout, out (T, H, D) -> d qkv (T, 3, H, D), contiguous, written by the backward kernels."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = _views(qkv)
    impl = resolve("attention_varlen_bwd", qkv.device, q)[1]
    impl(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale, _views(dqkv))
    return dqkv


varlen_qkvpacked_backward_op = torch.library.custom_op(
    "aimv2_kernels::prefix_causal_attention_varlen_qkvpacked_backward",
    mutates_args=())(_varlen_qkvpacked_backward_body)


@varlen_qkvpacked_backward_op.register_fake
def _(dout, qkv, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _setup(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, prefix_len, causal, scale = inputs
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
    ctx.save_for_backward(qkv, cu_seqlens, prefix_len, output[0], output[1])


def _backward(ctx, dout, _dlse):
    if dout is None:  # only lse was used (gradients are not materialized: see autograd.py)
        return (None,) * 6
    qkv, cu_seqlens, prefix_len, out, lse = ctx.saved_tensors
    dqkv = call(varlen_qkvpacked_backward_op, _varlen_qkvpacked_backward_body, dout, qkv, out, lse, cu_seqlens,
                ctx.max_seqlen, prefix_len, ctx.causal, ctx.scale)
    return dqkv, None, None, None, None, None


_varlen_qkvpacked_call = register_autograd(varlen_qkvpacked_op, _attention_varlen_qkvpacked, _backward, _setup)


def prefix_causal_attention_varlen_qkvpacked(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, prefix_len=None, *,
                                             causal: bool = True, scale: float | None = None) -> Tensor:
    """`prefix_causal_attention_varlen` of the q, k, v packed in qkv (T, 3, H, D) (one fused
    projection's output over n packed sequences, viewed as such; any strides with a contiguous last
    dim). cu_seqlens, max_seqlen and prefix_len as there. Returns (T, H, D); the backward writes the
    gradient of qkv in its (T, 3, H, D) layout, with no stack of three gradients."""
    check_tensor("qkv", qkv, ndim=4)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (T, 3, H, D), got {tuple(qkv.shape)}")
    check_last_dim_contiguous("qkv", qkv)
    check_head_dim("qkv", qkv.shape[-1])
    check_cu_seqlens(cu_seqlens, qkv.shape[0], qkv.device, device_of="qkv")
    check_max_seqlen(max_seqlen)
    scale = attention_scale(causal, scale, qkv.shape[-1])
    prefix = prefix_tensor(prefix_len, cu_seqlens.shape[0] - 1, qkv.device, "n",
                           "one prefix length per sequence: len(cu_seqlens) - 1", device_of="qkv")
    return _varlen_qkvpacked_call(qkv, cu_seqlens, max_seqlen, prefix if causal else None, causal, scale)[0]
