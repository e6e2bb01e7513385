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
from .autograd import call, register_autograd
from ..validation import (
    attention_scale,
    check_prefix_values,
    check_qkv,
    prefix_tensor,
)


def empty_bshd_output(q: Tensor) -> Tensor:
    """Uninitialized (B, H, S, D) view of (B, S, H, D) memory, like q's dtype and device."""
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2)


# ---- gradient layouts ----------------------------------------------------------------------------
# dq, dk, dv are allocated like q, k, v (empty_like), or, when q, k, v are the three views of one
# packed projection output such as (B, S, 3, H, D), as the three views of one buffer of that layout.
# Autograd still gathers them into the projection's gradient (unbind's backward is torch.stack, a
# copy whatever the layout), but from the packed buffer that is a block copy of contiguous rows
# instead of a strided gather: 0.5 ms instead of 30 ms on the CPU at B=4, S=256, H=8, D=64.

def empty_grads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialized dq, dk, dv like q, k, v (the layout the unpacked backward op declares)."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _dense(sizes: tuple[int, ...], strides: list[int]) -> bool:
    """True when a tensor of these sizes and strides covers a block of memory exactly once (what
    torch.empty_strided can allocate): sorted by stride, each stride is the product of the inner sizes."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(sizes, strides) if sz > 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def packed_grad_strides(q: Tensor, k: Tensor, v: Tensor) -> Optional[list[int]]:
    """Strides of one (B, H, S, 3, D) buffer whose [..., i, :] views have the layout of (q, k, v)[i],
    or None when the three are not views of one packed tensor.

    They are when they have the same strides and k, v start `step` and 2 * step elements after q
    (step > 0), and (B, H, S, 3, D) with q's strides and `step` for the 3 is dense: the views of one
    (B, S, 3, H, D) or (3, B, S, H, D) projection output, for instance. Only metadata is read, so
    torch.compile's fake tensors decide the same (symbolic sizes: None, the unpacked layout)."""
    if not q.stride() == k.stride() == v.stride():
        return None
    offsets = [t.storage_offset() for t in (q, k, v)]
    if not all(type(x) is int for x in (*q.shape, *q.stride(), *offsets)) or q.numel() == 0:
        return None
    step = offsets[1] - offsets[0]
    if step <= 0 or offsets[2] - offsets[1] != step:
        return None
    B, H, S, D = q.shape
    sb, sh, ss, sd = q.stride()
    strides = [sb, sh, ss, step, sd]
    return strides if _dense((B, H, S, 3, D), strides) else None


def empty_packed_grads(q: Tensor, grad_strides: list[int]) -> Tensor:
    """Uninitialized (B, H, S, 3, D) gradient buffer with the strides `packed_grad_strides` chose."""
    B, H, S, D = q.shape
    return torch.empty_strided((B, H, S, 3, D), grad_strides, dtype=q.dtype, device=q.device)


# ---- "torch" backend -----------------------------------------------------------------------------
# On the CPU, ATen's fused flash-attention kernels (forward with the log-sum-exp, and its backward)
# with the prefix-causal mask given as an additive bias: no (B, H, S, S) scores in memory, and at the
# tiny preset's shapes (B=64, H=2, S=64, D=32) 5-10x faster than the dense einsum path below, which
# stays for float64 (the checking dtype runs the reference's math) and for other devices (the Triton
# and CUDA backends serve CUDA; this is their fallback).

_cpu_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _cpu_flash_mask(q: Tensor, prefix_len: Optional[Tensor], causal: bool) -> dict:
    """is_causal / attn_mask arguments of the CPU flash kernels for this visibility rule: plain
    causal without a prefix, no mask when not causal, else a (B, 1, S, S) bias (0 or -inf) in q's dtype."""
    if not causal:
        return {"is_causal": False, "attn_mask": None}
    if prefix_len is None:
        return {"is_causal": True, "attn_mask": None}
    visible = ref.prefix_visibility(q.shape[2], prefix_len, causal, device=q.device).unsqueeze(1)
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    return {"is_causal": False, "attn_mask": bias}


def _on_cpu_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype != torch.float64


@register("attention_fwd", "torch")
def _attention_fwd_torch(q, k, v, prefix_len, causal, scale):
    if _on_cpu_flash(q):
        out, lse = _cpu_flash_fwd(q, k, v, 0.0, scale=scale, **_cpu_flash_mask(q, prefix_len, causal))
    else:
        out, lse = ref.prefix_causal_attention_with_lse(q, k, v, prefix_len, causal, scale)
    result = empty_bshd_output(q)
    result.copy_(out)
    # (B, H, S) contiguous as the fake kernel declares (the CPU kernel's is a (B, S, H) transpose)
    return result, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()


@register("attention_bwd", "torch")
def _attention_bwd_torch(dout, q, k, v, out, lse, prefix_len, causal, scale, grads=None):
    """Softmax-attention backward from the saved log-sum-exp. Writes into `grads` (dq, dk, dv) when
    given, else into tensors allocated like q, k, v; returns them."""
    if _on_cpu_flash(q):
        dq, dk, dv = _cpu_flash_bwd(dout, q, k, v, out, lse, 0.0, scale=scale, **_cpu_flash_mask(q, prefix_len, causal))
    else:
        dq, dk, dv = _attention_bwd_dense(dout, q, k, v, out, lse, prefix_len, causal, scale)
    # In the layout the backward op's fake kernel declares (empty_grads or the packed buffer's views).
    grads = empty_grads(q, k, v) if grads is None else grads
    return tuple(buf.copy_(g) for buf, g in zip(grads, (dq, dk, dv)))


def _attention_bwd_dense(dout, q, k, v, out, lse, prefix_len, causal, scale):
    """The standard backward with a dense (B, H, S, S) mask, in float32 (float64 for float64)."""
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
    return dq, dk, dv


# ---- custom ops ----------------------------------------------------------------------------------

# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _attention(q: Tensor, k: Tensor, v: Tensor, prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) float32)."""
    if prefix_len is not None:
        check_prefix_values(prefix_len)
    return resolve("attention_fwd", q.device)[1](q, k, v, prefix_len, causal, scale)


attention_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention", mutates_args=())(_attention)


@attention_op.register_fake
def _(q, k, v, prefix_len, causal, scale):
    B, H, S, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return empty_bshd_output(q), q.new_empty(B, H, S, dtype=lse_dtype)


def _attention_backward_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return resolve("attention_bwd", q.device)[1](dout, q, k, v, out, lse, prefix_len, causal, scale)


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
    resolve("attention_bwd", q.device)[1](dout, q, k, v, out, lse, prefix_len, causal, scale, grads.unbind(3))
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
