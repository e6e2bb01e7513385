"""Backend selection: which implementation runs inside each custom op.

Every public op is one `torch.library` custom op (see `aimv2_kernels/ops/`). Its body asks this module
for an implementation of a named *kernel* ("rms_norm_fwd", "swiglu_bwd", ...) for the tensors' device.
Backends register implementations under those names:

    "torch"   `aimv2_kernels/torch_backend/`: PyTorch (always present; the CPU path)
    "triton"  `aimv2_kernels/triton_backend/`: Triton kernels (CUDA tensors, or CPU tensors when
              TRITON_INTERPRET=1, which runs the real kernels in Triton's interpreter)
    "cuda"    `aimv2_kernels/cuda_backend/`: the compiled csrc/ extension (CUDA tensors only)
    "auto"    not an implementation: picks per kernel the fastest available one for the device

This module is the ground floor: it imports nothing of the project but auto_table. Each backend package declares
itself here when it is imported (`declare`: how to ask whether it can run on this machine, and how to
load its kernels, which then `register` themselves); the package facade imports all three.

Resolution for a kernel and a device:
  * CPU tensors run "torch", except that an explicit "triton" choice runs the interpreter when
    TRITON_INTERPRET=1. A CPU tensor never reaches a compiled GPU kernel.
  * CUDA tensors with "auto" try the backend the card's measured table (auto_table.py) names for
    the op, dtype and size class of the call, then `AUTO_ORDER` (a fixed order), then "torch".
  * CUDA tensors with an explicit backend use it; a kernel that backend does not implement falls back
    along "cuda" -> "triton" -> "torch" (e.g. attention has no CUDA C++ kernel). An explicit backend
    that cannot run at all on this machine is an error, not a silent downgrade.

The default comes from AIMV2_KERNELS_BACKEND (else "auto"); `set_backend` changes it for the process
and `use_backend` for a `with` block (thread-local override).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator, Optional

import torch

from .auto_table import measured_choice, measured_table, size_class

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


DETERMINISTIC_ENV = "AIMV2_KERNELS_DETERMINISTIC"


def deterministic_algorithms() -> bool:
    """Whether kernels must give bit-identical results run to run: PyTorch's switch
    (`torch.use_deterministic_algorithms(True)`) or AIMV2_KERNELS_DETERMINISTIC=1. Read on every
    call, so either may change at any time. Kernels with a faster order-dependent variant (float
    atomic adds) run their deterministic one then."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get(DETERMINISTIC_ENV, "0").strip() == "1"


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# backend name -> (status: () -> None or why it cannot run here, load: () -> None), from `declare`
_DECLARED: dict[str, tuple[Callable[[], str | None], Callable[[], None]]] = {}
_loaded: set[str] = set()


def declare(name: str, status: Callable[[], str | None], load: Callable[[], None]) -> None:
    """Called by a backend package ("triton", "cuda") when it is imported. `status()` says why the
    backend cannot run on this machine (None: it can); `load()` imports its kernel modules, whose
    `register` calls fill the registry. The registry loads a backend the first time it is asked
    about one that can run."""
    _DECLARED[name] = (status, load)
    _loaded.discard(name)


def _status(name: str) -> str | None:
    declared = _DECLARED.get(name)
    if declared is None:
        return f"the {name} backend package was not imported (import aimv2_kernels)"
    status, load = declared
    reason = status()
    if reason is None and name not in _loaded:
        load()
        _loaded.add(name)
    return reason


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine, or None when it can."""
    _check_name(name)
    if name in ("torch", "auto"):
        return None
    return _status(name)


def available_backends() -> list[str]:
    """Concrete backends that can run here, in preference order (always ends with "torch")."""
    return [name for name in ("triton", "cuda", "torch") if unavailable_reason(name) is None]


def fallback(kernel: str) -> Callable:
    """The "torch" implementation of `kernel`: what a backend runs for an input its kernel cannot
    take (asked through the registry, so no backend imports another)."""
    return _REGISTRY[kernel]["torch"]


# (kernel, device type, chosen backend) -> the backend name `_resolve` picked. Every op call resolves
# its kernels, and a tiny call's whole budget is a few microseconds: the walk over availability and
# fallbacks runs once per key. The implementation itself is looked up in _REGISTRY on every call, so
# a test that swaps a registry entry is seen at once; `register` clears the cache. Failures (an
# explicit backend that cannot run here) are not cached: they raise every time.
_resolved: dict[tuple[str, str, str], str] = {}


def resolve(kernel: str, device: torch.device, example: Optional[torch.Tensor] = None) -> tuple[str, Callable]:
    """Pick (backend name, implementation) of `kernel` for tensors on `device`. `example`: the call's
    first tensor argument; under "auto" on a card with a measured table (auto_table.py) its dtype
    and size class choose the row."""
    chosen = get_backend()
    if chosen == "auto" and example is not None and device.type == "cuda" and _has_table(device):
        key = (kernel, "cuda", chosen, device.index, example.dtype, size_class(example.numel()))
    else:
        key = (kernel, device.type, chosen)
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve(kernel, device, chosen, example)[0]
    return name, _REGISTRY[kernel][name]


# CUDA device index -> whether its card has a measured table (asked once: without one, the cache key
# and the choice do not depend on the call's dtype and size)
_card_tables: dict[Optional[int], bool] = {}


def _has_table(device: torch.device) -> bool:
    found = _card_tables.get(device.index)
    if found is None:
        found = _card_tables[device.index] = bool(measured_table(torch.cuda.get_device_name(device)))
    return found


def _measured(kernel: str, device: torch.device, example: Optional[torch.Tensor]) -> tuple[str, ...]:
    """The backend this card's measured table picks for the call, as a 0- or 1-tuple."""
    if example is None:
        return ()
    card = torch.cuda.get_device_name(device)
    choice = measured_choice(kernel, card, str(example.dtype).removeprefix("torch."), example.numel())
    return (choice,) if choice else ()


def _resolve(kernel: str, device: torch.device, chosen: str, example: Optional[torch.Tensor] = None) -> tuple[str, Callable]:
    impls = _REGISTRY.get(kernel)
    if not impls or "torch" not in impls:
        raise KeyError(f"no reference implementation registered for kernel {kernel!r}")
    if device.type != "cuda":
        if chosen == "triton" and interpreter_enabled() and unavailable_reason("triton") is None and "triton" in impls:
            return "triton", impls["triton"]
        return "torch", impls["torch"]
    if chosen == "auto":
        candidates = _measured(kernel, device, example) + AUTO_ORDER.get(kernel, _DEFAULT_AUTO_ORDER) + ("torch",)
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
