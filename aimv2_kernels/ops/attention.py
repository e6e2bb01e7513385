"""Prefix-causal attention as custom ops.

Key j is visible to query i iff (not causal) or j <= i or j < prefix_len[b]. q, k, v are (B, H, S, D)
with any strides and a contiguous last dim. The output and gradient layouts are in
`aimv2_kernels/layouts.py`; the implementations in the backend packages.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve
from ..layouts import empty_bshd_output, empty_grads, empty_packed_grads, packed_grad_strides
from .autograd import call, register_autograd
from ..validation import (
    attention_scale,
    check_qkv,
    prefix_tensor,
)


def check_prefix(prefix_len: Tensor) -> None:
    """prefix_len >= 0, checked by the backend that serves its device: on the host for CPU tensors,
    asynchronously on the GPU (no sync; one tiny launch under "triton")."""
    resolve("prefix_check", prefix_len.device)[1](prefix_len)


# ---- custom ops ----------------------------------------------------------------------------------

# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _attention(q: Tensor, k: Tensor, v: Tensor, prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) float32)."""
    if prefix_len is not None:
        check_prefix(prefix_len)
    return resolve("attention_fwd", q.device, q)[1](q, k, v, prefix_len, causal, scale)


attention_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention", mutates_args=())(_attention)


@attention_op.register_fake
def _(q, k, v, prefix_len, causal, scale):
    B, H, S, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_bshd_output(q), q.new_empty(B, H, S, dtype=lse_dtype)


def _attention_backward_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return resolve("attention_bwd", q.device, q)[1](dout, q, k, v, out, lse, prefix_len, causal, scale)


attention_backward_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_backward",
                                                mutates_args=())(_attention_backward_body)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, prefix_len, causal, scale):
    return empty_grads(q, k, v)


def _attention_backward_packed_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    prefix_len: Optional[Tensor], causal: bool, scale: float,
                                    grad_strides: list[int]) -> Tensor:
    """The backward into one (B, H, S, 3, D) buffer with strides `grad_strides`; [..., i, :] is the
    gradient of (q, k, v)[i]. The layout is an argument, not read off q, k, v here, so the real and
    the fake kernel return the same strides whatever tensors torch.compile passes at run time."""
    grads = empty_packed_grads(q, grad_strides)
    resolve("attention_bwd", q.device, q)[1](dout, q, k, v, out, lse, prefix_len, causal, scale, grads.unbind(3))
    return grads


attention_backward_packed_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_backward_packed",
                                                       mutates_args=())(_attention_backward_packed_body)


@attention_backward_packed_op.register_fake
def _(dout, q, k, v, out, lse, prefix_len, causal, scale, grad_strides):
    return empty_packed_grads(q, grad_strides)


def _setup_attention(ctx, inputs, output):
    q, k, v, prefix_len, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, prefix_len, output[0], output[1])


def _attention_backward(ctx, dout, _dlse):
    if dout is None:  # only lse was used (gradients are not materialized: see autograd.py)
        return None, None, None, None, None, None
    q, k, v, prefix_len, out, lse = ctx.saved_tensors
    args = (dout, q, k, v, out, lse, prefix_len, ctx.causal, ctx.scale)
    grad_strides = packed_grad_strides(q, k, v)
    if grad_strides is None:
        dq, dk, dv = call(attention_backward_op, _attention_backward_body, *args)
    else:  # views of one packed projection: the gradients as views of one buffer of that layout
        dq, dk, dv = call(attention_backward_packed_op, _attention_backward_packed_body, *args, grad_strides).unbind(3)
    return dq, dk, dv, None, None, None


_attention_call = register_autograd(attention_op, _attention, _attention_backward, _setup_attention)


# ---- functional API ------------------------------------------------------------------------------

def _prefix_tensor(prefix_len, batch: int, device: torch.device) -> Optional[Tensor]:
    """None, an int, or an integer tensor (B,) -> None or an int tensor (B,) on `device`."""
    return prefix_tensor(prefix_len, batch, device, "B", "one prefix length per sample: the batch size of q")


def prefix_causal_attention(q: Tensor, k: Tensor, v: Tensor, prefix_len=None, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Attention where key j is visible to query i iff (not causal) or j <= i or j < prefix_len[b].

    q, k, v: (B, H, S, D) with a contiguous last dim (any other strides). prefix_len: None (plain causal,
    or bidirectional when causal=False), an int, or an int tensor (B,) on q's device; values >= S make
    every key visible. scale defaults to D ** -0.5. Returns (B, H, S, D), a view of (B, S, H, D) memory.
    """
    check_qkv(q, k, v, "(B, H, S, D)")
    if q.shape[2] == 0:
        raise ValueError(f"q must have at least one position (S >= 1), got shape {tuple(q.shape)}")
    scale = attention_scale(causal, scale, q.shape[-1])
    prefix = _prefix_tensor(prefix_len, q.shape[0], q.device)
    return _attention_call(q, k, v, prefix if causal else None, causal, scale)[0]
