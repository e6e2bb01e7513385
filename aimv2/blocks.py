"""The pre-norm transformer block shared by encoder and decoder, and the original weight init.

A block computes x = x + Attn(norm1(x), mask); x = x + SwiGLU(norm2(x)). Every residual add is fused
into the RMSNorm that follows it (`ak.rms_norm_residual`): a block takes the stream and the update
still to be added, and returns the new stream and its own pending update, which the next block's
norm1 (or the final norm) adds. Same math, one pass over the activations fewer per add.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import aimv2_kernels as ak


def add_norm(update: Tensor | None, stream: Tensor, norm: ak.nn.RMSNorm) -> tuple[Tensor, Tensor]:
    """(norm(stream + update), stream + update); update None means nothing to add.

    The fused op needs one dtype; under autocast the update (a bf16 matmul output) and the fp32
    stream differ, and the add promotes as it would in eager PyTorch.
    """
    if update is None:
        return norm(stream), stream
    if update.dtype != stream.dtype:
        stream = stream + update
        return norm(stream), stream
    return ak.rms_norm_residual(update, stream, norm.weight, norm.eps)


class Block(nn.Module):
    """One pre-norm block: keys norm1, attn (qkv, proj), norm2, mlp (fc1, fc2, fc3); no biases."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = ak.nn.RMSNorm(dim, eps=eps)
        self.attn = ak.nn.PrefixCausalSelfAttention(dim, heads)
        self.norm2 = ak.nn.RMSNorm(dim, eps=eps)
        self.mlp = ak.nn.SwiGLU(dim, hidden)

    def forward(self, stream: Tensor, update: Tensor | None, prefix_len: Tensor | None, causal: bool) -> tuple[Tensor, Tensor]:
        """stream, update (B, S, D) -> (stream, update) with this block's MLP output left pending."""
        h, stream = add_norm(update, stream, self.norm1)
        attn_out = self.attn(h, prefix_len, causal=causal)
        h, stream = add_norm(attn_out, stream, self.norm2)
        return stream, self.mlp(h)


def run_blocks(blocks: nn.ModuleList, final_norm: ak.nn.RMSNorm, x: Tensor, prefix_len: Tensor | None = None,
               causal: bool = True) -> Tensor:
    """x (B, S, D) through every block, then the final norm: (B, S, D)."""
    update = None
    for block in blocks:
        x, update = block(x, update, prefix_len, causal)
    return add_norm(update, x, final_norm)[0]


def make_blocks(dim: int, depth: int, heads: int, hidden: int, eps: float) -> nn.ModuleList:
    return nn.ModuleList(Block(dim, heads, hidden, eps) for _ in range(depth))


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The original init, for `module.apply`: xavier-uniform linears and convs (a conv weight seen
    as (out, in * k * k)), zero biases, normal(0.02) embeddings. Norm weights keep their ones."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
