"""Where one training step's time goes, by kernel class, from torch.profiler.

On a GPU every kernel the step launches is classed by its name (our Triton and CUDA C++ kernels,
cuBLAS/CUTLASS GEMMs, PyTorch's elementwise and optimizer kernels) and its device time summed; "idle"
is the rest of the step's wall time, when the GPU ran nothing (host overhead, synchronization). On a
CPU (the smoke run) the same classes sum each operator's own (self) CPU time, which exercises the code
and means little.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

# (class, substrings of a lower-cased kernel or operator name), first match wins: attention before
# GEMM, since the CuTe attention kernels carry "cutlass"/"cute" in their names too.
CLASSES = (
    ("attention", ("attention", "attn", "flash", "fmha", "sdpa")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm", "_column_sum")),
    ("swiglu", ("swiglu", "silu")),
    ("loss", ("ce_rows", "cross_entropy", "patch_mse", "log_softmax", "nll_loss", "mse_loss")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "_fused_")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm", "conv")),
    ("elementwise and casts", ("elementwise", "vectorized", "copy", "cast", "fill", "reduce", "cat", "index",
                               "memset", "memcpy", "aten::to", "aten::add", "aten::mul", "aten::sum")),
)
OTHER, IDLE = "other", "idle"


def classify(name: str) -> str:
    lowered = name.lower()
    for cls, needles in CLASSES:
        if any(n in lowered for n in needles):
            return cls
    return OTHER


def time_by_class(step: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Milliseconds per class over one call of `step` (already warmed up), largest first, idle included
    on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    totals: dict[str, float] = {}
    if cuda:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                cls = classify(e.name)
                totals[cls] = totals.get(cls, 0.0) + e.time_range.elapsed_us() / 1e3
        totals[IDLE] = max(wall_ms - sum(totals.values()), 0.0)
    else:
        for avg in prof.key_averages():
            cls = classify(avg.key)
            totals[cls] = totals.get(cls, 0.0) + avg.self_cpu_time_total / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def summary(totals: dict[str, float]) -> str:
    """'gemm 61% (12.3 ms), attention 14% (...), ...': a table cell."""
    whole = sum(totals.values()) or 1.0
    return ", ".join(f"{cls} {100 * ms / whole:.0f}% ({ms:.1f} ms)" for cls, ms in totals.items())
