"""The "triton" backend: Triton kernels. Each module holds one op family's kernels, their launchers
and `@register(kernel_name, "triton")` implementations; `common` what they share and `kernel_config`
the compile-check entries they list. Importing this package only declares the backend to the
registry (triton itself is imported when a kernel is first resolved), so adding a module here is all
it takes to plug a kernel in."""
from __future__ import annotations

import functools
import importlib
import pkgutil

import torch

from .. import backend


@functools.cache
def _status() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    if not (torch.cuda.is_available() or backend.interpreter_enabled()):
        return "no CUDA device and TRITON_INTERPRET is not 1"
    return None


def _load() -> None:
    """Import every kernel module of this package: their @register decorators fill the registry."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


backend.declare("triton", _status, _load)
