"""Varlen prefix-causal attention on a mixed-size packed batch, against the same batch padded.

A native-resolution batch: N images of different patch counts (lengths drawn uniformly in [lo, hi]
with a fixed seed), heads 8, head dim 128, bf16; each image draws its own prefix length in 1..len-1.
GPU: 64 images of 16 to 1024 patches. CPU smoke run: 3 images of 5 to 40 tokens, fp32.

Providers, all computing the same values on the same tokens:
- ours (`ak.prefix_causal_attention_varlen`) on the packed (T, 3, H, D) projection output, its
  Triton backward both the default way and the deterministic way ("ours-triton deterministic",
  AIMV2_KERNELS_DETERMINISTIC=1; fwd+bwd only);
- "ours padded": our padded op `ak.prefix_causal_attention` on the Triton backend, the batch padded
  with zeros to the longest image (B, S_max, 3, H, D), one prefix per image: rows and keys past an
  image's length are wasted work (a valid row never sees them: its keys are j <= i or j < prefix);
- "sdpa dense mask": SDPA on the padded batch with the (B, 1, S_max, S_max) boolean prefix mask;
- FlexAttention over the packed sequence (1, H, T, D) with a document-plus-prefix block mask, built
  per batch inside the timed region ("flex+mask", as a step with a new batch must) or once outside it
  ("flex"). Needs CUDA (skipped on the CPU smoke run).

The packed and padded inputs of a case hold the same values (the padded tensor is the packed one
scattered into zeros). TFLOP/s counts the useful work only, for every provider: the (query, key)
pairs visible inside each image under the prefix rule, 4 * D FLOPs per pair forward, 3.5 times that
for forward+backward (as benchmarks/attention.py). Target (SPEC section 6): ours >= 1.5x "ours
padded", forward and forward+backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aimv2_kernels.reference import prefix_visibility

from . import providers as P
from .attention import FLOPS_PER_PAIR, _flex_parts, flex_providers, heads
from .harness import FWD, FWD_BWD, Case, Context, Provider, Result, run_cases
from .targets import Verdict, speedup_vs

NAME = "varlen"
X_LABEL = "tokens in the packed batch"
OP = "prefix_attention_varlen"
SHAPES = ((64, 16, 1024, 8, 128),)  # (images, shortest, longest, H, D)
SMOKE_SHAPES = ((3, 5, 40, 2, 32),)
KERNELS = ("attention_varlen",)
PADDED = "ours padded"


@dataclass
class Batch:
    """One packed batch's layout: lengths (n,), prefix (n,) in 1..len-1, cu_seqlens (n + 1,) int32."""

    lengths: torch.Tensor
    prefix: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    heads: int
    dim: int

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.lengths.to(device), self.prefix.to(device), self.cu_seqlens.to(device), self.max_seqlen,
                     self.heads, self.dim)

    def token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, position in the image) of every packed token, each (T,) int64."""
        lengths = self.lengths.long()
        image = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        pos = torch.arange(self.tokens, device=lengths.device) - self.cu_seqlens.long()[:-1][image]
        return image, pos


def draw_batch(n: int, lo: int, hi: int, H: int, D: int, seed: int = 0) -> Batch:
    """Lengths uniform in [lo, hi] and prefixes uniform in 1..len-1, from a fixed seed (on the CPU)."""
    if lo < 2:
        raise ValueError("every image needs at least 2 tokens for a prefix in 1..len-1")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    prefix = (torch.rand(n, generator=gen, dtype=torch.float64) * (lengths - 1)).long() + 1
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return Batch(lengths, prefix.clamp(max=lengths - 1), cu, int(lengths.max()), H, D)


def useful_pairs(batch: Batch) -> float:
    """(query, key) pairs visible inside the images under the prefix rule, over the heads: per image
    of length L and prefix m, the causal L (L + 1) / 2 plus the m (m - 1) / 2 keys j > i in the prefix."""
    L = batch.lengths.double()
    m = torch.minimum(batch.prefix.double(), L)
    return batch.heads * float((L * (L + 1) / 2 + m * (m - 1) / 2).sum())


def pad(packed: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(T, ...) packed tokens -> (n, S_max, ...) with zeros past each image's length (a copy)."""
    image, pos = batch.token_index()
    out = packed.new_zeros(len(batch.lengths), batch.max_seqlen, *packed.shape[1:])
    out[image, pos] = packed
    return out


def unpad(padded: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(n, S_max, ...) -> (T, ...): the valid rows, packed."""
    image, pos = batch.token_index()
    return padded[image, pos]


# ---- providers: each takes the inputs (packed qkv, padded qkv, dense mask, batch) --------------------

def ours_fn(qkv, _padded, _dense, batch):
    import aimv2_kernels as ak

    q, k, v = qkv.unbind(1)  # (T, H, D) views of the (T, 3, H, D) projection
    return ak.prefix_causal_attention_varlen(q, k, v, batch.cu_seqlens, batch.max_seqlen, batch.prefix)


def padded_fn(_qkv, padded, _dense, batch):
    import aimv2_kernels as ak

    return ak.prefix_causal_attention(*heads(padded), batch.prefix)  # (B, H, S_max, D)


def sdpa_dense(_qkv, padded, dense, _batch):
    return F.scaled_dot_product_attention(*heads(padded), attn_mask=dense)


def doc_prefix_mask_mod(batch: Batch):
    """FlexAttention's mask_mod over the packed sequence: key j visible to query i iff both lie in the
    same image and (j <= i or j's position in its image < that image's prefix)."""
    image, pos = batch.token_index()
    prefix = batch.prefix.long()[image]  # per token

    def doc_prefix(b, h, q_idx, kv_idx):
        same = image[q_idx] == image[kv_idx]
        return same & ((kv_idx <= q_idx) | (pos[kv_idx] < prefix[q_idx]))
    return doc_prefix


def flex_block_mask(batch: Batch):
    T = batch.tokens
    return _flex_parts()[1](doc_prefix_mask_mod(batch), None, None, T, T, device=batch.cu_seqlens.device)


def _packed_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(T, 3, H, D) -> q, k, v as (1, H, T, D) views."""
    return tuple(t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))


def _bind_flex(mask_inside: bool):
    def bind(inputs):
        qkv, _, _, batch = inputs
        attn = _flex_parts()[0]
        if mask_inside:
            return lambda: attn(*_packed_heads(qkv), block_mask=flex_block_mask(batch))
        prebuilt = flex_block_mask(batch)
        return lambda: attn(*_packed_heads(qkv), block_mask=prebuilt)
    return bind


def padded_provider(ctx: Context) -> Provider:
    """Our padded op on the Triton backend, as the alternative ours must beat (not "ours" itself)."""
    triton = next(p for p in P.ours(ctx, padded_fn, ("attention",)) if p.backend == "triton")
    triton.name, triton.ours, triton.mask = PADDED, False, "prefix"
    return triton


def providers(ctx: Context) -> list[Provider]:
    ours = P.ours(ctx, ours_fn, KERNELS)
    for p in ours:
        p.mask = "prefix"
    return [*ours, P.deterministic(next(p for p in ours if p.backend == "triton")), padded_provider(ctx),
            P.eager(sdpa_dense, "sdpa dense mask", mask="prefix"), *flex_providers(ctx, _bind_flex)]


# ---- cases ---------------------------------------------------------------------------------------

def make_inputs(batch: Batch, dtype: torch.dtype, device: torch.device, grad: bool) -> tuple:
    """(packed qkv (T, 3, H, D), the same values padded (n, S_max, 3, H, D), dense mask, batch); the
    two qkv tensors are separate leaves so each provider's backward reaches only its own."""
    packed = torch.randn(batch.tokens, 3, batch.heads, batch.dim, device=device, dtype=dtype)
    padded = pad(packed, batch)
    dense = prefix_visibility(batch.max_seqlen, batch.prefix, device=device).unsqueeze(1)  # (n, 1, S, S)
    return packed.requires_grad_(grad), padded.requires_grad_(grad), dense, batch


def cases(ctx: Context, modes=(FWD, FWD_BWD)) -> list[Case]:
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    out = []
    for n, lo, hi, H, D in SMOKE_SHAPES if ctx.smoke else SHAPES:
        batch = draw_batch(n, lo, hi, H, D, seed=n * hi).to(ctx.device)  # the same draw for every provider
        pairs = useful_pairs(batch)
        size = f"n{n} L{lo}-{hi} T{batch.tokens} Smax{batch.max_seqlen} H{H} D{D}"

        def make(grad, batch=batch):
            return make_inputs(batch, dtype, ctx.device, grad)

        for mode in modes:
            out.append(Case(NAME, OP, mode, size, batch.tokens, make,
                            lambda _p, mode=mode, D=D, pairs=pairs: FLOPS_PER_PAIR[mode] * D * pairs,
                            "TFLOP/s", "matmul", dtype=dtype, elements=batch.tokens * H * D))
    return out


def run(ctx: Context, log=print) -> list[Result]:
    return run_cases(ctx, cases(ctx), providers(ctx), log)


def targets(results: list[Result]) -> list[Verdict]:
    return [speedup_vs(results, NAME, OP, mode, PADDED, 1.5,
                       f"varlen attention {mode} vs the same batch padded (our padded kernel)")
            for mode in (FWD, FWD_BWD)]
