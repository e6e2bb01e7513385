"""The AIMv2 loss: ours (fused patch MSE + linear cross-entropy) against materializing the logits.

Per size: T text tokens with hidden width 1024 and a 32000-token vocabulary (labels ~5% padding), and
T patch predictions of 588 values (T / 256 images of 256 patches, random prefixes deciding which
patches count). Providers: ours `ak.aimv2_loss`; eager PyTorch (bf16 logits = hidden @ W.T in full,
fp32 cross-entropy, per-patch normalized MSE); torch.compile of that; Liger-Kernel's fused linear
cross-entropy plus the same eager MSE; Apple's Cut Cross-Entropy (`linear_cross_entropy`, which never
writes the logits to memory) plus the same eager MSE; and the `gemm floor`: the three GEMMs a fused
linear cross-entropy cannot avoid (logits, d hidden, d weight) at full size and nothing else, timed in
the same run so each row reads as ours / floor. Reported: time, tokens per second and the peak memory a
call allocates beyond its inputs. Targets: ours under 5% of the materialized path's peak memory,
>= 1.2x Liger and within 1.15x of the GEMM floor; the line against Cut Cross-Entropy is informational
(SPEC names Liger).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import providers as P
from .harness import FWD, FWD_BWD, Case, Context, Provider, Result, run_cases
from .targets import Verdict, memory_ratio, speedup_vs

NAME = "loss"
X_LABEL = "tokens"
# 2048: a small per-GPU batch, where a fused loss has few chunks to spread its fixed costs over.
TOKENS, TOKENS_QUICK = (2048, 8192, 16384, 32768), (2048, 8192, 32768)
DIM, VOCAB, PATCH_DIM, PATCHES = 1024, 32000, 588, 256
SMOKE = dict(tokens=(48,), dim=32, vocab=97, patch_dim=12, patches=16)
ALPHA, IGNORE, NORM_PIX_EPS = 0.4, -100, 1e-6
KERNELS = ("patch_mse", "linear_ce")


def ours_fn(pixel_pred, patches, mask, hidden, weight, labels):
    import aimv2_kernels as ak

    return ak.aimv2_loss(pixel_pred, patches, mask, hidden, weight, labels, alpha=ALPHA, ignore_index=IGNORE).total


def eager_patch_mse(pred, target, mask):
    """Mean over counted patches of the per-patch MSE against the per-patch normalized target."""
    t = target.float()
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    per_patch = (pred.float() - t).pow(2).mean(-1)
    counted = mask.float()
    return (per_patch * counted).sum() / counted.sum().clamp_min(1)


def materialized(pixel_pred, patches, mask, hidden, weight, labels):
    logits = hidden @ weight.t()  # (T, V): the full logits, what the fused loss avoids
    text = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    return ALPHA * eager_patch_mse(pixel_pred, patches, mask) + text


def liger_loss(lf):
    def fn(pixel_pred, patches, mask, hidden, weight, labels):
        text = lf.liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE)
        return ALPHA * eager_patch_mse(pixel_pred, patches, mask) + text
    return fn


def cce_loss(linear_cross_entropy):
    def fn(pixel_pred, patches, mask, hidden, weight, labels):
        # e = embeddings (N, D), c = classifier (V, D); its default reduction is the mean over
        # non-ignored tokens, as ours and F.cross_entropy.
        text = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE)
        return ALPHA * eager_patch_mse(pixel_pred, patches, mask) + text
    return fn


class _GemmFloor(torch.autograd.Function):
    """Forward: logits = hidden @ W.T. Backward: d hidden = logits @ W and d weight = logits.T @ hidden,
    the logits standing in for their gradient (same shape and dtype). Exactly the three GEMMs."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.t()
        ctx.save_for_backward(hidden, weight, logits)
        return logits.new_zeros(())  # a scalar to call backward on; the logits stay saved

    @staticmethod
    def backward(ctx, _):
        hidden, weight, logits = ctx.saved_tensors
        return logits @ weight, logits.t() @ hidden


def gemm_floor(pixel_pred, patches, mask, hidden, weight, labels):
    return _GemmFloor.apply(hidden, weight)


LIGER, CCE, FLOOR = "liger FLCE + torch MSE", "cce + torch MSE", "gemm floor"


def providers(ctx: Context) -> list[Provider]:
    return [
        *P.ours(ctx, ours_fn, KERNELS),
        P.eager(materialized, "eager materialized"),
        P.compiled(ctx, materialized),
        P.liger(ctx, liger_loss, LIGER),
        P.cut_cross_entropy(ctx, cce_loss, CCE),
        # not the loss (no softmax, no MSE): a bound to read ours against, never "best alternative"
        P.eager(gemm_floor, FLOOR, comparable=False, bound=True),
    ]


def cases(ctx: Context, modes=None) -> list[Case]:
    if ctx.smoke:
        s = SMOKE
        sizes, dim, vocab, pdim, npatch = s["tokens"], s["dim"], s["vocab"], s["patch_dim"], s["patches"]
    else:
        sizes, dim, vocab, pdim, npatch = TOKENS_QUICK if ctx.quick else TOKENS, DIM, VOCAB, PATCH_DIM, PATCHES
    modes = modes or ((FWD_BWD,) if ctx.quick else (FWD, FWD_BWD))
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    dev = ctx.device
    out = []
    for tokens in sizes:
        images = max(tokens // npatch, 1)

        def make(grad, tokens=tokens, images=images):
            hidden = torch.randn(tokens, dim, device=dev, dtype=dtype, requires_grad=grad)
            weight = (0.02 * torch.randn(vocab, dim, device=dev, dtype=dtype)).requires_grad_(grad)
            labels = torch.randint(0, vocab, (tokens,), device=dev)
            labels[torch.rand(tokens, device=dev) < 0.05] = IGNORE
            pixel_pred = torch.randn(images, npatch, pdim, device=dev, dtype=dtype, requires_grad=grad)
            patches = torch.randn(images, npatch, pdim, device=dev)  # fp32 pixels, as the model patchifies them
            prefix = torch.randint(1, npatch, (images, 1), device=dev)
            mask = torch.arange(npatch, device=dev)[None] >= prefix  # (images, N): patches past the prefix count
            return pixel_pred, patches, mask, hidden, weight, labels

        for mode in modes:
            out.append(Case(NAME, "aimv2_loss", mode, f"T{tokens} D{dim} V{vocab}", tokens, make,
                            lambda _p, t=tokens: t, "Mtok/s", dtype=dtype))
    return out


def run(ctx: Context, log=print) -> list[Result]:
    return run_cases(ctx, cases(ctx), providers(ctx), log)


def targets(results: list[Result]) -> list[Verdict]:
    return [
        memory_ratio(results, NAME, "aimv2_loss", FWD_BWD, "eager materialized", 0.05,
                     "loss fwd+bwd peak memory / materialized logits"),
        speedup_vs(results, NAME, "aimv2_loss", FWD_BWD, LIGER, 1.2, "loss fwd+bwd vs Liger FLCE + MSE"),
        speedup_vs(results, NAME, "aimv2_loss", FWD_BWD, CCE, 1.0, "loss fwd+bwd vs Cut Cross-Entropy + MSE",
                   informational=True),
        # floor ms / ours ms: 1 / 1.15 means ours within 1.15x of the three GEMMs alone
        speedup_vs(results, NAME, "aimv2_loss", FWD_BWD, FLOOR, 1 / 1.15, "loss fwd+bwd: GEMM floor / ours"),
    ]
