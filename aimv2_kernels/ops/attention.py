"""Prefix-causal attention as custom ops.

Key j is visible to query i iff (not causal) or j <= i or j < prefix_len[b]. q, k, v are (B, H, S, D)
with any strides and a contiguous last dim. The output is allocated as (B, S, H, D) memory and
returned as its (B, H, S, D) view, so `out.transpose(1, 2).reshape(B, S, H * D)` costs no copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ..backend import register, resolve
from .autograd import register_autograd
from ..validation import (
    INDEX_DTYPES,
    check_head_dim,
    check_last_dim_contiguous,
    check_prefix_values,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)


def empty_bshd_output(q: Tensor) -> Tensor:
    """Uninitialized (B, H, S, D) view of (B, S, H, D) memory, like q's dtype and device."""
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2)


# ---- "torch" backend -----------------------------------------------------------------------------

@register("attention_fwd", "torch")
def _attention_fwd_torch(q, k, v, prefix_len, causal, scale):
    out, lse = ref.prefix_causal_attention_with_lse(q, k, v, prefix_len, causal, scale)
    result = empty_bshd_output(q)
    result.copy_(out)
    return result, lse.float() if q.dtype != torch.float64 else lse


@register("attention_bwd", "torch")
def _attention_bwd_torch(dout, q, k, v, out, lse, prefix_len, causal, scale):
    """Standard softmax-attention backward from the saved log-sum-exp, with a dense mask."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf, of, dof = (t.to(cdt) for t in (q, k, v, out, dout))
    S = q.shape[2]
    visible = ref.prefix_visibility(S, prefix_len, causal, device=q.device).unsqueeze(1)  # (B|1, 1, S, S)
    scores = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale
    probs = torch.exp(scores - lse.to(cdt).unsqueeze(-1)).masked_fill(~visible, 0.0)  # (B, H, S, S)
    dv = torch.einsum("bhij,bhid->bhjd", probs, dof)
    dprobs = torch.einsum("bhid,bhjd->bhij", dof, vf)
    delta = (dof * of).sum(-1, keepdim=True)  # (B, H, S, 1) = rowsum(P * dP)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.einsum("bhij,bhjd->bhid", dscores, kf)
    dk = torch.einsum("bhij,bhid->bhjd", dscores, qf)
    # Allocated like the inputs (empty_like), the layout the fake kernel declares.
    return tuple(torch.empty_like(x).copy_(g) for x, g in ((q, dq), (k, dk), (v, dv)))


# ---- custom ops ----------------------------------------------------------------------------------

@torch.library.custom_op("aimv2_kernels::prefix_causal_attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) float32)."""
    if prefix_len is not None:
        check_prefix_values(prefix_len)
    return resolve("attention_fwd", q.device)[1](q, k, v, prefix_len, causal, scale)


@attention_op.register_fake
def _(q, k, v, prefix_len, causal, scale):
    B, H, S, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_bshd_output(q), q.new_empty(B, H, S, dtype=lse_dtype)


@torch.library.custom_op("aimv2_kernels::prefix_causal_attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return resolve("attention_bwd", q.device)[1](dout, q, k, v, out, lse, prefix_len, causal, scale)


@attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, prefix_len, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_attention(ctx, inputs, output):
    q, k, v, prefix_len, causal, scale = inputs
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, prefix_len, output[0], output[1])


def _attention_backward(ctx, dout, _dlse):
    q, k, v, prefix_len, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, prefix_len, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


register_autograd(attention_op, _attention_backward, _setup_attention)


# ---- functional API ------------------------------------------------------------------------------

def _prefix_tensor(prefix_len, batch: int, device: torch.device) -> Optional[Tensor]:
    """None, an int, or an integer tensor of shape (B,) -> None or an int tensor (B,) on `device`."""
    if prefix_len is None:
        return None
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, Tensor)):
        raise TypeError(f"prefix_len must be None, an int or an integer tensor of shape (B,), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        return torch.full((batch,), prefix_len, dtype=torch.int32, device=device)
    check_tensor("prefix_len", prefix_len, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("prefix_len", prefix_len, (batch,), "one prefix length per sample: the batch size of q")
    if prefix_len.device != device:
        raise ValueError(f"prefix_len is on {prefix_len.device} but q is on {device}; expected the same device")
    return prefix_len


def prefix_causal_attention(q: Tensor, k: Tensor, v: Tensor, prefix_len=None, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Attention where key j is visible to query i iff (not causal) or j <= i or j < prefix_len[b].

    q, k, v: (B, H, S, D) with a contiguous last dim (any other strides). prefix_len: None (plain causal,
    or bidirectional when causal=False), an int, or an int tensor (B,) on q's device; values >= S make
    every key visible. scale defaults to D ** -0.5. Returns (B, H, S, D), a view of (B, S, H, D) memory.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
        check_last_dim_contiguous(name, t)
    check_shape("k", k, tuple(q.shape), "the shape of q: (B, H, S, D)")
    check_shape("v", v, tuple(q.shape), "the shape of q: (B, H, S, D)")
    check_same_device("q", q, k=k, v=v)
    check_same_dtype("q", q, k=k, v=v)
    check_head_dim("q", q.shape[-1])
    if q.shape[2] == 0:
        raise ValueError(f"q must have at least one position (S >= 1), got shape {tuple(q.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    prefix = _prefix_tensor(prefix_len, q.shape[0], q.device)
    return attention_op(q, k, v, prefix if causal else None, causal, float(scale))[0]
