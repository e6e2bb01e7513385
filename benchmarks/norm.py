"""RMSNorm: ours against torch's F.rms_norm (eager), torch.compile of it, and Liger-Kernel.

bf16 activations and weight, 16384 rows, hidden 1024..8192 (the AIMv2 widths and SwiGLU widths),
forward and forward+backward. GB/s counts the op's minimum traffic: forward reads x and writes y;
backward reads dy and x and writes dx (rstd and the weight are negligible), so fwd+bwd moves 5 rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import providers as P
from .harness import FWD, FWD_BWD, Case, Context, Provider, Result, rowwise_cases, run_cases
from .targets import Verdict, bandwidth_targets

NAME = "norm"
X_LABEL = "hidden size"
ROWS, HIDDEN, HIDDEN_QUICK = 16384, (1024, 2048, 3072, 4096, 5632, 8192), (1024, 8192)
SMOKE_ROWS, SMOKE_HIDDEN = 24, (160,)  # CPU: tiny, and not a power of two
EPS = 1e-5
KERNELS = ("rms_norm",)
ROWS_MOVED = {FWD: 2, FWD_BWD: 5}


def ours_fn(x, w):
    import aimv2_kernels as ak

    return ak.rms_norm(x, w, EPS)


def torch_fn(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def providers(ctx: Context) -> list[Provider]:
    return [
        *P.ours(ctx, ours_fn, KERNELS),
        P.eager(torch_fn),
        P.compiled(ctx, torch_fn),
        P.liger(ctx, lambda lf: (lambda x, w: lf.liger_rms_norm(x, w, EPS))),
    ]


def make_inputs(rows, hidden, dtype, device, grad):
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=grad)
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_(grad)
    return x, w


def cases(ctx: Context, modes=(FWD, FWD_BWD)) -> list[Case]:
    sizes = (SMOKE_ROWS, SMOKE_HIDDEN) if ctx.smoke else (ROWS, HIDDEN_QUICK if ctx.quick else HIDDEN)
    return rowwise_cases(ctx, NAME, "rms_norm", sizes, {m: ROWS_MOVED[m] for m in modes}, make_inputs)


def run(ctx: Context, log=print) -> list[Result]:
    return run_cases(ctx, cases(ctx), providers(ctx), log)


def targets(results: list[Result]) -> list[Verdict]:
    return bandwidth_targets(results, NAME, "rms_norm", "RMSNorm")
