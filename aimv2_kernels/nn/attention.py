"""Self-attention module with the prefix-causal mask: fused qkv projection, the op, output projection."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import prefix_causal_attention


class PrefixCausalSelfAttention(nn.Module):
    """x (B, S, dim) -> (B, S, dim). Keys are stable: `qkv.weight` (3 * dim, dim) stacking q, k, v;
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

    def forward(self, x: torch.Tensor, prefix_len=None, causal: bool = True) -> torch.Tensor:
        B, S, _ = x.shape
        qkv = self.qkv(x).view(B, S, 3, self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) views, no copy
        out = prefix_causal_attention(q, k, v, prefix_len, causal=causal)  # (B, H, S, D) view of (B, S, H, D)
        return self.proj(out.transpose(1, 2).reshape(B, S, self.dim))
