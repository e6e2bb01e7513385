"""The "torch" backend's prefix-causal attention (padded (B, H, S, D) layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from ..backend import register
from ..layouts import empty_bshd_output, empty_grads
from ..validation import check_prefix_values

# prefix_len >= 0: at once on the host for CPU tensors, three asynchronous launches on CUDA (the
# "triton" backend's check is one)
register("prefix_check", "torch")(check_prefix_values)


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
    """fp32/bf16/fp16 CPU tensors with something to compute (the CPU kernel dies of a division by
    zero on an empty sequence axis)."""
    return q.device.type == "cpu" and q.dtype != torch.float64 and q.numel() > 0


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
