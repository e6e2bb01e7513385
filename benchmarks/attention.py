"""Prefix-causal attention: ours against SDPA with a dense boolean mask (the official recipe's path),
FlexAttention with the same mask, and for reference plain-causal SDPA and flash-attn.

bf16, heads 8, head dim 128 (AIMv2), random prefix lengths in 1..S-1 per sample: B=128 at S=256 (one
AIMv2 encoder batch) and B=8 at S=4096 (long sequences, same token count). q, k, v are the
(B, H, S, D) views of one (B, S, 3, H, D) projection output, as in a model.

TFLOP/s counts only the (query, key) pairs each provider's mask leaves visible: 4 * D FLOPs per pair
forward (q.k and p.v), 2.5 times that backward. A plain causal mask sees fewer pairs than the prefix
mask, so its providers are listed as "other mask" and never count as the alternative to beat.
FlexAttention runs twice: with its block mask built once outside the timed region ("flex"), and
with the block mask built inside it ("flex+mask"), as a training step that draws new prefixes must.
Our Triton backward runs twice too: the default one ("ours-triton", dQ summed with atomic adds) and
the deterministic one ("ours-triton deterministic", AIMV2_KERNELS_DETERMINISTIC=1; fwd+bwd only).
Forward and forward+backward at every shape, quick runs included: the targets are per mode.
"""
from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F

from aimv2_kernels.reference import prefix_visibility

from . import providers as P
from .harness import FWD, FWD_BWD, Case, Context, Provider, Result, run_cases
from .targets import Verdict, speedup_vs

NAME = "attention"
X_LABEL = "sequence length"
# (B, H, S, D): about 8M tokens x heads per shape; D = 64 at twice the heads (the same width)
SHAPES = ((128, 8, 256, 128), (32, 8, 1024, 128), (8, 8, 4096, 128), (2, 8, 16384, 128),
          (128, 16, 256, 64), (8, 16, 4096, 64))
SHAPES_QUICK = ((128, 8, 256, 128), (8, 8, 4096, 128))  # gpu_check's budget
SMOKE_SHAPES = ((2, 2, 48, 32),)  # S not a multiple of any block size
KERNELS = ("attention",)
FLOPS_PER_PAIR = {FWD: 4, FWD_BWD: 4 * 3.5}  # times D


def heads(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, 3, H, D) -> q, k, v as (B, H, S, D) views (no copy)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def ours_fn(qkv, prefix, _dense):
    import aimv2_kernels as ak

    return ak.prefix_causal_attention(*heads(qkv), prefix)


def sdpa_dense(qkv, _prefix, dense):
    return F.scaled_dot_product_attention(*heads(qkv), attn_mask=dense)


def sdpa_causal(qkv, _prefix, _dense):
    return F.scaled_dot_product_attention(*heads(qkv), is_causal=True)


def visible_pairs(prefix: torch.Tensor, heads_: int, seq: int, mask: str) -> float:
    """(query, key) pairs a mask leaves visible, over the batch and heads."""
    causal = seq * (seq + 1) / 2
    if mask == "causal":
        return heads_ * prefix.numel() * causal
    m = prefix.clamp(max=seq).double()
    return heads_ * float((causal + m * (m - 1) / 2).sum())  # plus keys j > i inside the prefix


# ---- FlexAttention -------------------------------------------------------------------------------

_FLEX = {}


def _flex_parts():
    """(compiled flex_attention, block-mask builder), made once per process."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _FLEX["attn"] = torch.compile(flex_attention, dynamic=False)
        if "_compile" in inspect.signature(create_block_mask).parameters:
            _FLEX["mask"] = lambda *a, **k: create_block_mask(*a, _compile=True, **k)
        else:
            _FLEX["mask"] = torch.compile(create_block_mask)
    return _FLEX["attn"], _FLEX["mask"]


def block_mask(prefix: torch.Tensor, seq: int):
    def prefix_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix[b])

    return _flex_parts()[1](prefix_causal, prefix.shape[0], None, seq, seq, device=prefix.device)


def _bind_flex(mask_inside: bool):
    def bind(inputs):
        qkv, prefix, _ = inputs
        attn, seq = _flex_parts()[0], qkv.shape[1]
        if mask_inside:
            return lambda: attn(*heads(qkv), block_mask=block_mask(prefix, seq))
        prebuilt = block_mask(prefix, seq)
        return lambda: attn(*heads(qkv), block_mask=prebuilt)
    return bind


def flex_providers(ctx: Context, bind_flex=None) -> list[Provider]:
    """FlexAttention with its block mask built outside ("flex") and inside ("flex+mask") the timed
    region; bind_flex(mask_inside) -> the provider's bind (default: this suite's padded batches)."""
    bind_flex = bind_flex or _bind_flex
    skip = P.needs_cuda(ctx, "FlexAttention")
    if skip is None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            skip = f"skipped: FlexAttention does not import ({exc})"
    return [Provider("flex", bind_flex(False), skip=skip, mask="prefix"),
            Provider("flex+mask", bind_flex(True), skip=skip, mask="prefix")]


def flash_provider(ctx: Context) -> Provider:
    def load():
        from flash_attn import flash_attn_func

        def fn(qkv, _prefix, _dense):  # takes and returns (B, S, H, D)
            return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
        return fn
    return P.peer(ctx, "flash-attn causal", "flash-attn", load, comparable=False, mask="causal")


def providers(ctx: Context) -> list[Provider]:
    ours = P.ours(ctx, ours_fn, KERNELS)
    for p in ours:
        p.mask = "prefix"
    return [
        *ours,
        P.deterministic(next(p for p in ours if p.backend == "triton")),
        P.eager(sdpa_dense, "sdpa dense mask", mask="prefix"),
        *flex_providers(ctx),
        P.eager(sdpa_causal, "sdpa is_causal", comparable=False, mask="causal"),
        flash_provider(ctx),
    ]


def cases(ctx: Context, modes=(FWD, FWD_BWD)) -> list[Case]:
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    out = []
    for B, H, S, D in SMOKE_SHAPES if ctx.smoke else (SHAPES_QUICK if ctx.quick else SHAPES):
        gen = torch.Generator().manual_seed(S)
        prefix = torch.randint(1, S, (B,), generator=gen).to(ctx.device)  # the same draw for every provider

        def make(grad, B=B, H=H, S=S, D=D, prefix=prefix):
            qkv = torch.randn(B, S, 3, H, D, device=ctx.device, dtype=dtype, requires_grad=grad)
            dense = prefix_visibility(S, prefix, device=ctx.device).unsqueeze(1)  # (B, 1, S, S), True = visible
            return qkv, prefix, dense

        for mode in modes:
            def flops(p, mode=mode, H=H, S=S, D=D, prefix=prefix):
                return FLOPS_PER_PAIR[mode] * D * visible_pairs(prefix, H, S, p.mask or "prefix")

            out.append(Case(NAME, "prefix_attention", mode, f"B{B} H{H} S{S} D{D}", S, make, flops, "TFLOP/s", "matmul",
                            dtype=dtype, elements=B * S * H * D))
    return out


def run(ctx: Context, log=print) -> list[Result]:
    results = run_cases(ctx, cases(ctx), providers(ctx), log)
    if not ctx.smoke:
        from aimv2_kernels.triton_backend.attention import picked_configs, s_bucket

        attach_configs(results, picked_configs(), s_bucket)
    return results


# The Triton kernels each ours-triton row runs, by (provider, mode): the default backward is one
# dK/dV/dQ pass ("bwd", dQ summed with atomic adds), the deterministic one a dK/dV and a dQ kernel.
TRITON_KERNELS = {
    ("ours-triton", FWD): ("fwd",),
    ("ours-triton", FWD_BWD): ("fwd", "bwd"),
    ("ours-triton" + P.DETERMINISTIC_SUFFIX, FWD_BWD): ("fwd", "dkdv", "dq"),
}
KERNEL_ORDER = ("fwd", "bwd", "dkdv", "dq")  # launch order, the order a row lists its configs in


def attach_configs(results: list[Result], picked: list[dict], bucket) -> None:
    """Record on every timed ours-triton row (default and deterministic) the configs its Triton
    kernels ran with (what the autotuners picked for its head dim and S bucket, prefix-causal), as
    extra["triton configs"]: e.g. "fwd 128x64 w8 s3; bwd 64x128 w8 s2" for the default fwd+bwd,
    "fwd 128x64 w8 s3; dkdv 64x128 w8 s2; dq 128x64 w8 s2" for the deterministic one."""
    for r in results:
        kernels = TRITON_KERNELS.get((r.provider, r.mode))
        found = re.search(r"S(\d+) D(\d+)", r.size)
        if kernels is None or not r.ms or not found:
            continue
        S, D = int(found.group(1)), int(found.group(2))
        used = [f"{row['kernel']} {row['config']}" for row in picked
                if row["kernel"] in kernels and row["head_dim"] == D
                and (row["key"] is None or (row["key"]["S_BUCKET"] == bucket(S) and row["key"]["HAS_PREFIX"]))]
        r.extra["triton configs"] = "; ".join(sorted(used, key=lambda u: KERNEL_ORDER.index(u.split()[0])))


def targets(results: list[Result]) -> list[Verdict]:
    verdicts = []
    for mode in (FWD, FWD_BWD):
        verdicts += [
            speedup_vs(results, NAME, "prefix_attention", mode, "flex", 1.2,
                       f"attention {mode} vs FlexAttention (same mask, block mask built outside)"),
            speedup_vs(results, NAME, "prefix_attention", mode, "sdpa dense mask", 3.0, f"attention {mode} vs SDPA dense mask"),
        ]
    return verdicts
