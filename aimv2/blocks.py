"""The pre-norm transformer block shared by encoder and decoder, and the original weight init.

A block computes x = x + Attn(norm1(x), mask); x = x + SwiGLU(norm2(x)). Every residual add is fused
into the RMSNorm that follows it (`ak.rms_norm_residual`): a block takes the stream and the update
still to be added, and returns the new stream and its own pending update, which the next block's
norm1 (or the final norm) adds. The input itself arrives as a stream plus a first update (the
position embeddings plus the token content), so even the first block's norm1 is a fused add.
Same math, one pass over the activations fewer per add.

Under bf16 autocast the stream is float32 (the float32 position embeddings start it) while every
update is a bf16 matmul output: the fused op adds in float32, keeps the stream float32 and hands the
normalized rows to the next matmul in bf16.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import aimv2_kernels as ak


# (cu_seqlens (n + 1,) int32, max_seqlen host int) of packed sequences
Packing = tuple[Tensor, int]

# Update dtypes that ak.rms_norm_residual adds into a (wider) float32 stream.
_NARROW_UPDATES = (torch.float16, torch.bfloat16)


def _fuses(update: Tensor, stream: Tensor) -> bool:
    """Whether ak.rms_norm_residual takes this pair: one dtype, or a float32 stream and a 16-bit update."""
    return update.dtype == stream.dtype or (stream.dtype == torch.float32 and update.dtype in _NARROW_UPDATES)


def add_norm(update: Tensor | None, stream: Tensor, norm: ak.nn.RMSNorm) -> tuple[Tensor, Tensor]:
    """(norm(stream + update), stream + update), both (B, S, D); update None means nothing to add.

    The fused op returns the new stream in the stream's dtype and the normalized rows in the
    update's. A pair it does not take (a stream narrower than its update) adds in eager PyTorch first.
    """
    if update is None:
        return norm(stream), stream
    if not _fuses(update, stream):
        stream = stream + update
        return norm(stream), stream
    eps = torch.finfo(stream.dtype).eps if norm.eps is None else norm.eps  # as the module's own default
    return ak.rms_norm_residual(update, stream, norm.weight, eps)


class Block(nn.Module):
    """One pre-norm block: keys norm1, attn (qkv, proj), norm2, mlp (fc1, fc2, fc3); no biases."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = ak.nn.RMSNorm(dim, eps=eps)
        self.attn = ak.nn.PrefixCausalSelfAttention(dim, heads)
        self.norm2 = ak.nn.RMSNorm(dim, eps=eps)
        self.mlp = ak.nn.SwiGLU(dim, hidden)

    def forward(self, stream: Tensor, update: Tensor | None, prefix_len: Tensor | None, causal: bool,
                packing: Packing | None = None) -> tuple[Tensor, Tensor]:
        """stream, update (B, S, D), or (T, D) packed -> (stream, update) with this block's MLP output
        left pending."""
        h, stream = add_norm(update, stream, self.norm1)
        packed = {} if packing is None else {"cu_seqlens": packing[0], "max_seqlen": packing[1]}
        attn_out = self.attn(h, prefix_len, causal=causal, **packed)
        h, stream = add_norm(attn_out, stream, self.norm2)
        return stream, self.mlp(h)


def run_blocks(blocks: nn.ModuleList, final_norm: ak.nn.RMSNorm, x: Tensor, prefix_len: Tensor | None = None,
               causal: bool = True, *, update: Tensor | None = None, packing: Packing | None = None) -> Tensor:
    """x + update (B, S, D each) through every block, then the final norm: (B, S, D).

    x is the residual stream and update the first addition to it (None: nothing), left to the first
    block's norm1 so that the add is fused there too; x may be a broadcast view (expanded positions).
    packing (cu_seqlens, max_seqlen): x and update are (T, D) packed sequences, prefix_len one per
    sequence, and attention stays inside each sequence.
    """
    for block in blocks:
        x, update = block(x, update, prefix_len, causal, packing)
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
