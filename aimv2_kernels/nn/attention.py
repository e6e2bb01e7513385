"""Self-attention module with the prefix-causal mask: fused qkv projection, the op, output projection.

With a prefix the module runs our op; without one (plain causal or bidirectional attention) PyTorch's
scaled_dot_product_attention, which computes the same thing exactly and measured faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention_qkvpacked import prefix_causal_attention_qkvpacked
from ..ops.attention_varlen_qkvpacked import prefix_causal_attention_varlen_qkvpacked


class PrefixCausalSelfAttention(nn.Module):
    """x (B, S, dim) -> (B, S, dim), or packed sequences x (T, dim) -> (T, dim) given cu_seqlens. Keys are stable: `qkv.weight` (3 * dim, dim) stacking q, k, v;
    `proj.weight` (dim, dim); `qkv.bias` when qkv_bias=True. The projections are bias-free by default,
    as in AIMv2."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, proj_bias: bool = False, device=None, dtype=None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        factory = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)

    def forward(self, x: torch.Tensor, prefix_len=None, causal: bool = True, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """prefix_len: None, an int, or an int tensor with one length per sample (B,) or per packed
        sequence (n,). cu_seqlens (n + 1,) int32 and max_seqlen (host int): x holds n sequences back to
        back and attention stays inside each (see ak.prefix_causal_attention_varlen)."""
        if cu_seqlens is not None:
            return self._forward_packed(x, prefix_len, causal, cu_seqlens, max_seqlen)
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.heads, self.head_dim)
        if prefix_len is None:
            # No prefix: plain causal (the decoder) or bidirectional (inference) attention, which
            # PyTorch's SDPA computes exactly and faster than ours (H200, bf16, S=256, forward+backward:
            # 0.52 ms against 1.13 for our CUDA kernel, benchmarks/RESULTS.md of 2026-12-04).
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) views
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2)  # (B, S, H, D)
        else:
            # the packed op: its backward writes the projection output's gradient whole (no stack of dq, dk, dv)
            out = prefix_causal_attention_qkvpacked(qkv, prefix_len, causal=causal)  # (B, S, H, D)
        return self.proj(out.reshape(B, S, self.dim))

    def _forward_packed(self, x, prefix_len, causal, cu_seqlens, max_seqlen) -> torch.Tensor:
        if x.dim() != 2 or max_seqlen is None:
            raise ValueError(f"packed attention takes x of shape (T, dim) and a max_seqlen, got {tuple(x.shape)} and "
                             f"max_seqlen={max_seqlen!r}")
        T = x.shape[0]
        qkv = self.qkv(x).view(T, 3, self.heads, self.head_dim)  # (T, 3, H, D)
        # the packed op: its backward writes the projection output's gradient whole (no stack of dq, dk, dv)
        out = prefix_causal_attention_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, prefix_len,
                                                       causal=causal)  # (T, H, D)
        return self.proj(out.reshape(T, self.dim))
