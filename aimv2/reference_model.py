"""The eager reference AIMv2: plain PyTorch, what a user would write without this library.

torch.nn.RMSNorm, a SwiGLU of three nn.Linear, SDPA with a dense boolean prefix mask (plain is_causal
in the decoder), targets by einops, and a loss that materializes the full logits. State-dict keys equal
those of `AIMv2Model`, so `ReferenceAIMv2Model(cfg).load_state_dict(model.state_dict())` shares
weights. Tests compare our model to it; benchmarks time against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import aimv2_kernels as ak

from .blocks import init_weights
from .config import AIMv2Config
from .patchify import resolve_prefix_len


def prefix_mask(num_tokens: int, prefix_len: Tensor) -> Tensor:
    """Bool (B, 1, S, S), True = may attend: key j visible to query i iff j <= i or j < prefix_len[b]."""
    i = torch.arange(num_tokens, device=prefix_len.device)
    causal = i[None, :] <= i[:, None]  # (S, S) [query, key]
    in_prefix = i[None, None, :] < prefix_len[:, None, None]  # (B, 1, S) by key
    return (causal[None] | in_prefix)[:, None]


class EagerAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, S, D = x.shape
        q, k, v = rearrange(self.qkv(x), "b s (three h d) -> three b h s d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, H, S, d)
        return self.proj(rearrange(out, "b h s d -> b s (h d)"))


class EagerSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class EagerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=eps)
        self.attn = EagerAttention(dim, heads)
        self.norm2 = nn.RMSNorm(dim, eps=eps)
        self.mlp = EagerSwiGLU(dim, hidden)

    def forward(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, is_causal)
        return x + self.mlp(self.norm2(x))


class EagerStack(nn.Module):
    """Blocks then the final norm (keys blocks.{i}.*, norm.weight)."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(EagerBlock(dim, heads, hidden, eps) for _ in range(depth))
        self.norm = nn.RMSNorm(dim, eps=eps)

    def run(self, x: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        for block in self.blocks:
            x = block(x, mask, is_causal)
        return self.norm(x)


class ReferenceEncoder(EagerStack):
    def __init__(self, c: AIMv2Config):
        super().__init__(c.enc_dim, c.enc_depth, c.enc_heads, c.enc_hidden, c.norm_eps)
        self.config = c
        self.patch_embed = nn.Conv2d(c.channels, c.enc_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_norm = nn.RMSNorm(c.enc_dim, eps=c.norm_eps)
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches, c.enc_dim) * 0.02)

    def forward(self, images: Tensor, prefix_len: Tensor | None = None) -> Tensor:
        x = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")
        x = self.patch_norm(x) + self.pos_embed
        mask = None if prefix_len is None else prefix_mask(x.shape[1], prefix_len)
        return self.run(x, mask)


class ReferenceDecoder(EagerStack):
    def __init__(self, c: AIMv2Config):
        super().__init__(c.dec_dim, c.dec_depth, c.dec_heads, c.dec_hidden, c.norm_eps)
        self.config = c
        self.image_proj = nn.Linear(c.enc_dim, c.dec_dim)
        self.token_embed = nn.Embedding(c.vocab_size, c.dec_dim)
        self.bos = nn.Parameter(torch.randn(1, 1, c.dec_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, c.max_text_len + 1, c.dec_dim) * 0.02)
        self.pixel_head = nn.Linear(c.dec_dim, c.patch_dim, bias=False)
        self.text_head = nn.Linear(c.dec_dim, c.vocab_size, bias=False)

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """-> pixel_pred (B, N - 1, P) for patches 1..N-1, text_hidden (B, T, dec_dim) for tokens 0..T-1."""
        (B, N, _), T = features.shape, tokens.shape[1]
        bos = self.bos.expand(B, 1, -1)
        text = torch.cat([bos, self.token_embed(tokens)], dim=1) + self.pos_embed[:, : T + 1]
        h = self.run(torch.cat([self.image_proj(features), text], dim=1), is_causal=True)
        return self.pixel_head(h[:, : N - 1]), h[:, N : N + T]


class ReferenceAIMv2Model(nn.Module):
    """Same forward contract as `AIMv2Model` (and the same prefix sampling), computed eagerly."""

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        self.encoder = ReferenceEncoder(config)
        self.decoder = ReferenceDecoder(config)
        self.apply(init_weights)

    def forward(self, images: Tensor, tokens: Tensor, prefix_len=None) -> ak.AIMv2Loss:
        c = self.config
        B, N = images.shape[0], c.num_patches
        prefix = resolve_prefix_len(prefix_len, B, N, training=self.training, eval_default=c.eval_prefix_len,
                                    device=images.device)
        pixel_pred, text_hidden = self.decoder(self.encoder(images, prefix), tokens)
        cdt = torch.promote_types(pixel_pred.dtype, torch.float32)  # losses in fp32 (fp64 for fp64 models)

        # pixel loss: per-patch normalized targets (unbiased variance), mean over counted patches
        target = rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=c.patch_size, q=c.patch_size)[:, 1:].to(cdt)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + c.norm_pix_eps).sqrt()
        per_patch = (pixel_pred.to(cdt) - target).pow(2).mean(-1)  # (B, N - 1)
        counted = torch.arange(1, N, device=images.device)[None] >= prefix[:, None]
        pixel = (per_patch * counted).sum() / counted.sum().clamp_min(1)

        # text loss: full logits, cross-entropy, mean over non-pad labels
        logits = self.decoder.text_head(text_hidden).to(cdt)  # (B, T, V)
        summed = F.cross_entropy(logits.flatten(0, 1), tokens.flatten().long(), ignore_index=c.pad_id, reduction="sum")
        text = summed / (tokens != c.pad_id).sum().clamp_min(1)
        return ak.AIMv2Loss(c.alpha * pixel + text, pixel, text)
