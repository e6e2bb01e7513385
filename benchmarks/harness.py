"""Measurement: timing, input rotation, peak memory, the card's own copy and matmul rates, versions.

Timing on a GPU is `triton.testing.do_bench`'s median (it clears L2 before every call and times with
CUDA events); the first call, where torch.compile and Triton build their kernels, runs before it and is
never timed. Beside it, "graph ms" is the same call replayed from a CUDA graph
(`do_bench_cudagraph`): GPU time without the host's work, so a row whose ms is well above its graph ms
is host-bound (graph replays do not clear L2; input rotation still applies). When one set of inputs fits in L2, calls rotate over several copies so that no provider
reads its inputs from a warm cache. On a CPU (the smoke run and pytest) a perf_counter median stands
in: its numbers only show that the harness works.

A benchmark case is described once (`Case`) and run for every provider (`Provider`) by `run_case`,
which turns the time into GB/s or TFLOP/s against what this card measured in the same run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

FWD, FWD_BWD = "fwd", "fwd+bwd"
_L2_FALLBACK_BYTES = 50 * 2**20  # H100's L2, for a device that does not report its own


# ---- timing ---------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
             grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median milliseconds of fn(). Call fn once before this (compilation is not timed here)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        warmup, rep = (25, 100) if quick else (50, 400)
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grad_to_none) or None,
                              return_mode="median"))
    times = []
    for _ in range(3 if quick else 5):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
             grad_to_none: Sequence[torch.Tensor] = ()) -> Optional[float]:
    """GPU time of fn: its median when replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`),
    so no host work is counted. Beside `bench_ms` it tells a host-bound row (ms well above graph ms)
    from a GPU-bound one. None on a CPU, and when fn cannot be captured (a host sync inside it)."""
    if device.type != "cuda":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=10 if quick else 20, grad_to_none=list(grad_to_none) or None,
                                        return_mode="median"))
    except Exception:  # noqa: BLE001 - not capturable: the row keeps its wall time only
        return None


def time_loop_ms(step: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> float:
    """Median milliseconds of one call of `step` (a whole training step), after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _L2_FALLBACK_BYTES)


def rotation_copies(bytes_per_set: int, device: torch.device, cap: int = 8) -> int:
    """How many copies of a case's inputs to cycle through so that together they overflow L2 twice."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set >= l2:
        return 1
    return min(cap, math.ceil(2 * l2 / max(bytes_per_set, 1)))


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory one call of fn allocates at its peak beyond what was allocated before it, in MiB."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def configure_compile() -> None:
    """Every (size, mode) of a suite compiles its own graph: let dynamo keep them all instead of
    silently falling back to eager after its default of 8 recompilations."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 256)


# ---- the card ------------------------------------------------------------------------------------

@dataclass
class Card:
    """What this device does in practice, measured at the start of a run: the roofs for every ratio."""

    name: str
    copy_gbps: float  # device-to-device copy: bytes read + bytes written per second / 1e9
    matmul_tflops: float  # dense bf16 (CUDA) or fp32 (CPU) square matmul, 2 M N K / s / 1e12
    l2_mib: float


def measure_card(device: torch.device, quick: bool = False) -> Card:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        numel, side, dtype = 2**28, 8192, torch.bfloat16  # 1 GiB fp32 copy; 8192^3 bf16 matmul
    else:
        name = platform.processor() or platform.machine() or "cpu"
        numel, side, dtype = 2**22, 512, torch.float32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device, quick=quick)
    copy_gbps = 2 * numel * src.element_size() / (copy_ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    a @ b
    mm_ms = bench_ms(lambda: a @ b, device, quick=quick)
    del a, b
    free_memory()
    return Card(name, copy_gbps, 2 * side**3 / (mm_ms * 1e-3) / 1e12, l2_bytes(device) / 2**20)


# ---- versions ------------------------------------------------------------------------------------

def _version_of(module_name: str, distribution: Optional[str] = None) -> str:
    """The version of an importable module; "-" when it does not import. Some peers
    (cut-cross-entropy) define no __version__, so the installed distribution's metadata answers."""
    try:
        module = __import__(module_name)
    except Exception:  # a peer that does not import is simply absent here
        return "-"
    if hasattr(module, "__version__"):
        return str(module.__version__)
    try:
        return importlib.metadata.version(distribution or module_name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "-"
    return out.stdout.strip() or "-"


def environment(device: torch.device) -> dict[str, str]:
    """Card, versions and time, repeated on every CSV row so rows from many runs can be pooled."""
    import aimv2_kernels as ak

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU smoke)"
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "-"),
        "triton": _version_of("triton"),
        "python": platform.python_version(),
        "aimv2_kernels": ak.__version__,
        "commit": _git_commit(),
        "backends": ",".join(ak.available_backends()),
        "liger_kernel": _version_of("liger_kernel"),
        "flash_attn": _version_of("flash_attn"),
        "cut_cross_entropy": _version_of("cut_cross_entropy", "cut-cross-entropy"),
    }


# ---- providers, cases, results ------------------------------------------------------------------

@dataclass
class Provider:
    """One way to compute a case: ours on a backend, or an alternative a user would otherwise pick.

    bind(inputs) -> a no-argument callable returning the forward output for those inputs; anything it
    does itself (building a mask, wrapping in torch.compile) happens outside the timed region.
    `comparable` alternatives compute exactly what ours computes and count for "best alternative";
    others (a plain causal mask where ours is prefix-causal) are shown for reference only.
    """

    name: str
    bind: Callable[[tuple], Callable[[], torch.Tensor]]
    ours: bool = False
    comparable: bool = True
    backend: Optional[str] = None  # ours: the aimv2_kernels backend set process-wide while timing
    skip: Optional[str] = None  # why this provider cannot run here
    skip_modes: dict[str, str] = field(default_factory=dict)  # mode -> why it does not run in that mode
    env: dict[str, str] = field(default_factory=dict)  # environment variables set while it runs
    mask: str = ""  # attention: which mask it applies ("prefix" or "causal"), for counting FLOPs
    note: str = ""  # shown beside its timings (e.g. which kernels fall back to another backend)
    bound: bool = False  # not the op but a bound to read it against (the loss's GEMM floor): other output

    def skip_reason(self, mode: str) -> Optional[str]:
        return self.skip or self.skip_modes.get(mode)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Set our backend for the process, not just this thread: on CUDA, autograd runs backward
        ops on its own device threads, which a thread-local `use_backend` block would not reach.
        `env` is set for the same span, not around the bound call alone: the backward runs after
        that call has returned, and reads its switches when it runs."""
        with environ(self.env):
            if self.backend is None:
                yield
                return
            import aimv2_kernels as ak

            previous = ak.get_backend()
            ak.set_backend(self.backend)
            try:
                with ak.use_backend(self.backend):
                    yield
            finally:
                ak.set_backend(previous)


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set inside the block; each variable gets its previous value (or its
    absence) back after it."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Case:
    """One size of one op in one mode. make_inputs(requires_grad) builds a fresh input tuple (the
    differentiable tensors require grad only for fwd+bwd); work(provider) is the bytes moved or FLOPs
    done, so the metric is work / time; unit is "GB/s", "TFLOP/s" or "Mtok/s". dtype: what the inputs
    are made in (bf16 on a GPU, fp32 on the CPU smoke run), recorded with every result."""

    suite: str
    op: str
    mode: str
    size: str
    x: float  # position on the plots' x axis
    make_inputs: Callable[[bool], tuple]
    work: Callable[[Provider], float]
    unit: str
    roof: Optional[str] = None  # "copy" or "matmul": which measured rate the metric is a fraction of
    dtype: Optional[torch.dtype] = None
    # elements of the op's first tensor argument (x, gate, q): the size class "auto" reads (auto_table.py)
    elements: Optional[int] = None


@dataclass
class Result:
    suite: str
    op: str
    mode: str
    size: str
    x: float
    provider: str
    ours: bool
    comparable: bool
    ms: Optional[float] = None
    metric: Optional[float] = None
    unit: str = ""
    dtype: str = ""  # "bfloat16", "float32", ...: what the case's inputs were made in
    roof_frac: Optional[float] = None  # metric / the card's measured copy or matmul rate
    peak_mib: Optional[float] = None
    speedup: Optional[float] = None  # ours: best comparable alternative's ms / ours (filled by report)
    elements: Optional[int] = None  # the case's: the size class "auto" reads
    extra: dict = field(default_factory=dict)  # suite-specific columns (step: batch, MFU)
    note: str = ""

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class Context:
    device: torch.device
    quick: bool
    card: Card
    # Called with every result the moment it is measured, so a run killed mid-suite keeps it.
    on_result: Callable[[object], None] = lambda result: None

    @property
    def smoke(self) -> bool:
        """CPU run: tiny sizes, reference and interpreter paths, numbers without meaning."""
        return self.device.type != "cuda"


def rowwise_cases(ctx: Context, suite: str, op: str, sizes: tuple[int, Sequence[int]], arrays_moved: dict[str, int],
                  make: Callable[..., tuple]) -> list[Case]:
    """Cases of a bandwidth-bound op on (rows, hidden) arrays for each hidden size and mode.

    sizes: (rows, hidden sizes). make(rows, hidden, dtype, device, requires_grad) -> inputs.
    arrays_moved[mode]: how many (rows, hidden) arrays the mode must at least read and write; the
    GB/s of every provider counts that minimum. bf16 on a GPU, fp32 on the CPU smoke run.
    """
    rows, hiddens = sizes
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    elem = torch.finfo(dtype).bits // 8
    out = []
    for hidden in hiddens:
        def inputs(grad, hidden=hidden):
            return make(rows, hidden, dtype, ctx.device, grad)

        for mode, arrays in arrays_moved.items():
            nbytes = arrays * rows * hidden * elem
            out.append(Case(suite, op, mode, f"{rows}x{hidden}", hidden, inputs, lambda _p, n=nbytes: n, "GB/s", "copy",
                            dtype=dtype, elements=rows * hidden))
    return out


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


def _tensors(inputs: tuple) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor)]


def _failure(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"failed: {type(exc).__name__}: {first[:160]}"


def prepare(case: Case, provider: Provider, device: torch.device) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """The callable to time for (case, provider) and the tensors whose .grad to clear between calls.

    Inputs are rotated over several copies when one set fits in L2. fwd+bwd backpropagates a fixed
    random output gradient (or from the scalar itself for a loss).
    """
    grad = case.mode == FWD_BWD
    first = case.make_inputs(grad)
    copies = rotation_copies(sum(t.numel() * t.element_size() for t in _tensors(first)), device)
    sets = [first] + [case.make_inputs(grad) for _ in range(copies - 1)]
    calls = [provider.bind(s) for s in sets]
    leaves = [t for s in sets for t in _tensors(s) if t.requires_grad]
    cycle = itertools.cycle(calls)
    if not grad:
        def forward():
            with torch.no_grad():
                return next(cycle)()
        return forward, leaves
    out = calls[0]()
    dout = torch.randn_like(out) if out.dim() else None
    del out

    def forward_backward():
        next(cycle)().backward(dout)
    return forward_backward, leaves


def run_case(ctx: Context, case: Case, provider: Provider) -> Result:
    """Time one provider on one case; a failure (out of memory, compile error) becomes a note."""
    result = Result(case.suite, case.op, case.mode, case.size, case.x, provider.name, provider.ours,
                    provider.comparable, unit=case.unit, dtype=dtype_name(case.dtype), note=provider.note)
    result.elements = case.elements
    skip = provider.skip_reason(case.mode)
    if skip:
        result.note = skip
        return result
    try:
        with provider.active():
            fn, leaves = prepare(case, provider, ctx.device)
            fn()  # compile / autotune / first-call allocations, never timed
            synchronize(ctx.device)
            result.ms = bench_ms(fn, ctx.device, quick=ctx.quick, grad_to_none=leaves)
            if ctx.device.type == "cuda":
                gpu = graph_ms(fn, ctx.device, quick=ctx.quick, grad_to_none=leaves)
                result.extra["graph ms"] = round(gpu, 4) if gpu is not None else "not capturable"
            for t in leaves:
                t.grad = None
            result.peak_mib = peak_memory_mib(fn, ctx.device)
    except Exception as exc:  # noqa: BLE001 - one provider's failure must not end the run
        result.ms, result.note = None, _failure(exc)
    finally:
        free_memory()
    if result.ms:
        scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "Mtok/s": 1e6}[case.unit]
        result.metric = case.work(provider) / (result.ms * 1e-3) / scale
        roof = {"copy": ctx.card.copy_gbps, "matmul": ctx.card.matmul_tflops}.get(case.roof or "")
        result.roof_frac = result.metric / roof if roof else None
    return result


def run_cases(ctx: Context, cases: Sequence[Case], providers: Sequence[Provider], log=print) -> list[Result]:
    results = []
    for case in cases:
        for provider in providers:
            r = run_case(ctx, case, provider)
            shown = f"{r.ms:.3f} ms" if r.ms else r.note
            log(f"  {case.op} {case.mode} {case.size} {provider.name}: {shown}")
            results.append(r)
            ctx.on_result(r)
    return results
