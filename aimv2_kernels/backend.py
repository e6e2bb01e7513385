"""Backend selection: which implementation runs inside each custom op.

Every public op is one `torch.library` custom op (see `aimv2_kernels/ops/`). Its body asks this module
for an implementation of a named *kernel* ("rms_norm_fwd", "swiglu_bwd", ...) for the tensors' device.
Backends register implementations under those names:

    "torch"   the pure-PyTorch reference (always present; the CPU path)
    "triton"  Triton kernels in `aimv2_kernels/triton_kernels/` (CUDA tensors, or CPU tensors when
              TRITON_INTERPRET=1, which runs the real kernels in Triton's interpreter)
    "cuda"    the compiled csrc/ extension (CUDA tensors only)
    "auto"    not an implementation: picks per kernel the fastest available one for the device

Resolution for a kernel and a device:
  * CPU tensors run "torch", except that an explicit "triton" choice runs the interpreter when
    TRITON_INTERPRET=1. A CPU tensor never reaches a compiled GPU kernel.
  * CUDA tensors with "auto" try `AUTO_ORDER` (per kernel, from benchmark measurements), then "torch".
  * CUDA tensors with an explicit backend use it; a kernel that backend does not implement falls back
    along "cuda" -> "triton" -> "torch" (e.g. attention has no CUDA C++ kernel). An explicit backend
    that cannot run at all on this machine is an error, not a silent downgrade.

The default comes from AIMV2_KERNELS_BACKEND (else "auto"); `set_backend` changes it for the process
and `use_backend` for a `with` block (thread-local override).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pkgutil
import threading
from typing import Callable, Iterator

import torch

BACKEND_NAMES = ("triton", "cuda", "torch", "auto")
_ENV_VAR = "AIMV2_KERNELS_BACKEND"

# kernel name -> backend name -> implementation
_REGISTRY: dict[str, dict[str, Callable]] = {}

# For "auto" on CUDA tensors: preferred backends per kernel, fastest first. Kernels not listed use
# _DEFAULT_AUTO_ORDER. Entries are filled in from benchmark measurements (see benchmarks/RESULTS.md).
#
# PROVISIONAL: no GPU measurement exists yet. Where both Triton and the CUDA C++ extension implement a
# kernel, Triton comes first because its kernels are checked numerically on the CPU (interpreter)
# while the CUDA kernels are only compile-checked until a GPU run; replace each entry with the faster
# backend measured by `python -m benchmarks`, citing the measurement (card, dtype, size, ms).
_TRITON_THEN_CUDA = ("triton", "cuda")
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    kernel: _TRITON_THEN_CUDA
    for kernel in ("rms_norm_fwd", "rms_norm_residual_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd",
                   "swiglu_packed_fwd", "swiglu_packed_bwd", "patch_mse_fwd", "patch_mse_bwd")
}
_DEFAULT_AUTO_ORDER = ("triton", "cuda")
_EXPLICIT_FALLBACK = {"cuda": ("cuda", "triton", "torch"), "triton": ("triton", "torch"), "torch": ("torch",)}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def _default_from_env() -> str:
    value = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKEND_NAMES:
        raise ValueError(f"environment variable {_ENV_VAR} must be one of {BACKEND_NAMES}, got {value!r}")
    return value


_global_backend = _default_from_env()
_local = threading.local()


def set_backend(name: str) -> None:
    """Select the backend for the whole process ("triton", "cuda", "torch" or "auto")."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force here: the innermost `use_backend` block, else the process default."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend; restores the previous one on exit (thread-local)."""
    _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def register(kernel: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as `backend`'s implementation of `kernel`."""
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'cuda', got {backend!r}")

    def wrap(fn: Callable) -> Callable:
        _REGISTRY.setdefault(kernel, {})[backend] = fn
        _resolved.clear()  # a new implementation may change what a kernel resolves to
        return fn

    return wrap


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_status() -> str | None:
    """None when the Triton backend can be used, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if not (torch.cuda.is_available() or interpreter_enabled()):
        return "no CUDA device and TRITON_INTERPRET is not 1"
    _import_package("aimv2_kernels.triton_kernels")
    return None


def _cuda_status() -> str | None:
    """None when the compiled CUDA extension is loaded, else the reason it is not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from aimv2_kernels import cuda_ext
    except ImportError as exc:
        return f"the CUDA backend module is missing ({exc})"
    reason = cuda_ext.load_status()
    if reason is None:
        importlib.import_module("aimv2_kernels.cuda_backend")  # a plug-in: registers its kernels here
    return reason


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, or None when it can."""
    _check_name(name)
    if name in ("torch", "auto"):
        return None
    return _triton_status() if name == "triton" else _cuda_status()


def available_backends() -> list[str]:
    """Concrete backends that can run here, in preference order (always ends with "torch")."""
    return [name for name in ("triton", "cuda", "torch") if unavailable_reason(name) is None]


def _import_package(package: str) -> None:
    """Import every module of a backend package so their @register decorators run."""
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")


# (kernel, device type, chosen backend) -> the backend name `_resolve` picked. Every op call resolves
# its kernels, and a tiny call's whole budget is a few microseconds: the walk over availability and
# fallbacks runs once per key. The implementation itself is looked up in _REGISTRY on every call, so
# a test that swaps a registry entry is seen at once; `register` clears the cache. Failures (an
# explicit backend that cannot run here) are not cached: they raise every time.
_resolved: dict[tuple[str, str, str], str] = {}


def resolve(kernel: str, device: torch.device) -> tuple[str, Callable]:
    """Pick (backend name, implementation) of `kernel` for tensors on `device`."""
    chosen = get_backend()
    key = (kernel, device.type, chosen)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(kernel, device, chosen)[0]
    return name, _REGISTRY[kernel][name]


def _resolve(kernel: str, device: torch.device, chosen: str) -> tuple[str, Callable]:
    impls = _REGISTRY.get(kernel)
    if not impls or "torch" not in impls:
        raise KeyError(f"no reference implementation registered for kernel {kernel!r}")
    if device.type != "cuda":
        if chosen == "triton" and interpreter_enabled() and _triton_status() is None and "triton" in impls:
            return "triton", impls["triton"]
        return "torch", impls["torch"]
    if chosen == "auto":
        candidates = AUTO_ORDER.get(kernel, _DEFAULT_AUTO_ORDER) + ("torch",)
        for name in candidates:
            # Availability first: asking loads the backend, which registers its implementations.
            if unavailable_reason(name) is None and name in impls:
                return name, impls[name]
        return "torch", impls["torch"]
    reason = unavailable_reason(chosen)
    if reason is not None:
        raise RuntimeError(f"backend {chosen!r} was selected but cannot run here: {reason}")
    for name in _EXPLICIT_FALLBACK[chosen]:
        if unavailable_reason(name) is None and name in impls:
            return name, impls[name]
    return "torch", impls["torch"]
