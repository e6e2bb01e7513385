"""SwiGLU silu(gate) * up: ours against eager PyTorch, torch.compile of it, and Liger-Kernel.

bf16, 16384 rows, hidden 1024..8192 (2816 is AIMv2-L's, 8192 AIMv2-3B's), forward and
forward+backward. GB/s counts the minimum traffic: forward reads gate and up and writes the output
(3 arrays); backward reads dout, gate and up and writes dgate and dup (5 arrays).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import providers as P
from .harness import FWD, FWD_BWD, Case, Context, Provider, Result, rowwise_cases, run_cases
from .targets import Verdict, bandwidth_targets

NAME = "swiglu"
X_LABEL = "hidden size"
ROWS, HIDDEN, HIDDEN_QUICK = 16384, (1024, 2048, 2816, 4096, 5632, 8192), (2816, 8192)
SMOKE_ROWS, SMOKE_HIDDEN = 24, (176,)
KERNELS = ("swiglu",)
ARRAYS_MOVED = {FWD: 3, FWD_BWD: 8}


def ours_fn(gate, up):
    import aimv2_kernels as ak

    return ak.swiglu(gate, up)


def torch_fn(gate, up):
    return F.silu(gate) * up


def providers(ctx: Context) -> list[Provider]:
    return [
        *P.ours(ctx, ours_fn, KERNELS),
        P.eager(torch_fn),
        P.compiled(ctx, torch_fn),
        P.liger(ctx, lambda lf: lf.liger_swiglu),
    ]


def make_inputs(rows, hidden, dtype, device, grad):
    gate = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=grad)
    up = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=grad)
    return gate, up


def cases(ctx: Context, modes=(FWD, FWD_BWD)) -> list[Case]:
    sizes = (SMOKE_ROWS, SMOKE_HIDDEN) if ctx.smoke else (ROWS, HIDDEN_QUICK if ctx.quick else HIDDEN)
    return rowwise_cases(ctx, NAME, "swiglu", sizes, {m: ARRAYS_MOVED[m] for m in modes}, make_inputs)


def run(ctx: Context, log=print) -> list[Result]:
    return run_cases(ctx, cases(ctx), providers(ctx), log)


def targets(results: list[Result]) -> list[Verdict]:
    return bandwidth_targets(results, NAME, "swiglu", "SwiGLU")
