"""host: per-call cost of one eager forward+backward of each op on tiny tensors, ours against PyTorch's own.

On tiny tensors (8 x 64 float32 for the row-wise ops) the math is negligible, so the time of a call is
what the layers above the kernel cost: validation, backend choice, autograd, launches, allocations.
Those cost the same on any machine, so this suite runs everywhere, the CPU included (our ops on the
"torch" backend; on a GPU also on "triton" and "cuda", with CUDA tensors). The alternative is
PyTorch's own op for the same math (`F.rms_norm`, `F.silu(g) * u`, SDPA, `F.cross_entropy` of the
logits, the composed norm-pix MSE).

Timing: rounds of many calls, each provider of an op in turn within every round, so that a change of
load on a shared machine slows them alike; a row's time is the median round's per-call time (wall
clock; on a GPU the round ends with a synchronize; one CPU thread; our backend set process-wide
with `set_backend`, outside the timed loop). Gradients come from `torch.autograd.grad`, so no
.grad is accumulated or reset inside the timed loop. Our rows carry "x PyTorch" (ours / PyTorch's,
what SPEC section 6 bounds: 1.5x for RMSNorm and the residual RMSNorm, 2x for SwiGLU) and the 1-minute
load average of the machine when the op was measured.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .harness import FWD_BWD, Context, Result, synchronize
from .targets import Verdict

NAME = "host"
X_LABEL = "op"
ROWS, HIDDEN = 8, 64
EPS = 1e-5
ROUNDS, ROUNDS_QUICK = 9, 5
ROUND_SECONDS = 0.05  # per provider per round: long enough to average out timer and scheduler noise
# SPEC section 6: ours / PyTorch's per eager forward+backward call, at most this.
TARGETS = {"rms_norm": 1.5, "rms_norm_residual": 1.5, "swiglu": 2.0}


@dataclass
class HostOp:
    """One op: make(device) -> (inputs, differentiable leaves); ours and theirs(*inputs) -> output(s)."""

    name: str
    size: str
    make: Callable[[torch.device], tuple[tuple, list[torch.Tensor]]]
    ours: Callable[..., object]
    theirs: Callable[..., object]


def _t(*shape, device, grad=True):
    return torch.randn(*shape, device=device).requires_grad_(grad)


def _rows(device):
    gate, up = _t(ROWS, HIDDEN, device=device), _t(ROWS, HIDDEN, device=device)
    return (gate, up), [gate, up]


def _packed_inputs(device):
    x = _t(ROWS, 2 * HIDDEN, device=device)
    return (x,), [x]


def _norm_inputs(device, residual=False):
    x, r, w = _t(ROWS, HIDDEN, device=device), _t(ROWS, HIDDEN, device=device), _t(HIDDEN, device=device)
    return ((x, r, w), [x, r, w]) if residual else ((x, w), [x, w])


def _attention_inputs(device):
    q, k, v = (_t(1, 2, ROWS, 16, device=device) for _ in range(3))
    return (q, k, v), [q, k, v]


def _patch_inputs(device):
    pred, target = _t(2, 4, 16, device=device), _t(2, 4, 16, device=device, grad=False)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]], device=device)
    return (pred, target, mask), [pred]


def _ce_inputs(device):
    hidden, weight = _t(ROWS, HIDDEN, device=device), _t(128, HIDDEN, device=device)
    labels = torch.randint(0, 128, (ROWS,), device=device)
    return (hidden, weight, labels), [hidden, weight]


def _eager_patch_mse(pred, target, mask):
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    counted = mask.to(pred.dtype)
    return ((pred - t).pow(2).mean(-1) * counted).sum() / counted.sum().clamp_min(1)


def _residual_then_norm(x, r, w):
    stream = x + r
    return F.rms_norm(stream, (HIDDEN,), w, EPS), stream


def _swiglu_packed_eager(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def host_ops() -> list[HostOp]:
    import aimv2_kernels as ak

    rows = f"{ROWS}x{HIDDEN}"
    return [
        HostOp("rms_norm", rows, _norm_inputs, lambda x, w: ak.rms_norm(x, w, EPS),
               lambda x, w: F.rms_norm(x, (HIDDEN,), w, EPS)),
        HostOp("rms_norm_residual", rows, lambda d: _norm_inputs(d, residual=True),
               lambda x, r, w: ak.rms_norm_residual(x, r, w, EPS), _residual_then_norm),
        HostOp("swiglu", rows, _rows, ak.swiglu, lambda g, u: F.silu(g) * u),
        HostOp("swiglu_packed", f"{ROWS}x{2 * HIDDEN}", _packed_inputs, ak.swiglu_packed, _swiglu_packed_eager),
        HostOp("prefix_causal_attention", f"1x2x{ROWS}x16", _attention_inputs, ak.prefix_causal_attention,
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        HostOp("patch_mse_loss", "2x4x16", _patch_inputs, ak.patch_mse_loss, _eager_patch_mse),
        HostOp("linear_cross_entropy", f"{ROWS}x{HIDDEN}, V=128", _ce_inputs, ak.linear_cross_entropy,
               lambda h, w, y: F.cross_entropy(h @ w.t(), y)),
    ]


def forward_backward(fn: Callable[..., object], inputs: tuple, leaves: list[torch.Tensor]) -> Callable[[], object]:
    """One eager forward and backward of fn(*inputs); output gradients fixed, made once outside."""
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = [torch.randn_like(o) for o in outs]

    def call():
        result = fn(*inputs)
        return torch.autograd.grad(list(result) if isinstance(result, tuple) else [result], leaves, grads)
    return call


def per_call_ms(calls: list[Callable[[], object]], device: torch.device, rounds: int,
                backends: Optional[list[Optional[str]]] = None) -> list[float]:
    """Median per-call milliseconds of each callable, the callables taking turns round by round.
    backends[i]: the aimv2_kernels backend set process-wide (outside the timed loop) for calls[i]."""
    import aimv2_kernels as ak

    backends = backends or [None] * len(calls)
    previous = ak.get_backend()

    def select(name):
        ak.set_backend(name or previous)

    counts = []
    for call, name in zip(calls, backends):  # calls per round: about ROUND_SECONDS, from a short estimate
        select(name)
        for _ in range(3):
            call()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            call()
        synchronize(device)
        counts.append(max(10, int(ROUND_SECONDS / max((time.perf_counter() - start) / 10, 1e-7))))
    samples: list[list[float]] = [[] for _ in calls]
    try:
        for _ in range(rounds):
            for call, name, n, times in zip(calls, backends, counts, samples):
                select(name)
                start = time.perf_counter()
                for _ in range(n):
                    call()
                synchronize(device)
                times.append((time.perf_counter() - start) / n * 1e3)
    finally:
        ak.set_backend(previous)
    return [statistics.median(times) for times in samples]


def _backends(ctx: Context) -> list[str]:
    """Our backends to time: the reference everywhere, the GPU backends where they run (the
    interpreter's Triton timings on a CPU would measure the interpreter)."""
    import aimv2_kernels as ak

    if ctx.smoke:
        return ["torch"]
    return ["torch"] + [b for b in ("triton", "cuda") if ak.unavailable_reason(b) is None]


def run(ctx: Context, log=print) -> list[Result]:
    import aimv2_kernels as ak

    results = []
    rounds = ROUNDS_QUICK if ctx.quick else ROUNDS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a thread pool only adds hand-offs and noise
    try:
        for index, op in enumerate(host_ops()):
            inputs, leaves = op.make(ctx.device)
            backends: list[Optional[str]] = _backends(ctx)
            calls = []
            for backend in backends:
                with ak.use_backend(backend):
                    calls.append(forward_backward(op.ours, inputs, leaves))
            names = [f"ours-{b}" for b in backends] + ["pytorch"]
            calls.append(forward_backward(op.theirs, inputs, leaves))
            load = round(os.getloadavg()[0], 2)
            times = per_call_ms(calls, ctx.device, rounds, backends + [None])
            theirs = times[-1]
            for name, ms in zip(names, times):
                ours = name != "pytorch"
                r = Result(NAME, op.name, FWD_BWD, op.size, index, name, ours, True, ms=ms, unit="",
                           dtype="float32", extra={"us/call": round(ms * 1e3, 1), "load": load})
                if ours:
                    r.extra["x PyTorch"] = round(ms / theirs, 2)
                log(f"  {op.name} {name}: {ms * 1e3:.1f} us/call" + (f" ({ms / theirs:.2f}x PyTorch)" if ours else ""))
                results.append(r)
                ctx.on_result(r)
    finally:
        torch.set_num_threads(threads)
    return results


def targets(results: list[Result]) -> list[Verdict]:
    """Per op with a SPEC bound and per backend: ours / PyTorch's per call (lower is better)."""
    verdicts = []
    for op, bound in TARGETS.items():
        rows = [r for r in results if r.op == op and r.ms]
        theirs: Optional[Result] = next((r for r in rows if r.provider == "pytorch"), None)
        for r in rows:
            if r.ours and theirs is not None:
                verdicts.append(Verdict(NAME, f"{op} host cost per call, {r.provider} / PyTorch's", r.ms / theirs.ms,
                                        bound, higher_is_better=False, sizes=1))
    return verdicts

