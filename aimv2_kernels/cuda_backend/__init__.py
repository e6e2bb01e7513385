"""The "cuda" backend: the compiled csrc/ kernels. `ext` builds or loads the extension, `kernels`
registers the norm, SwiGLU and loss kernels, `attention` the attention kernels (dispatched by card).
Importing this package only declares the backend to the registry; the extension is loaded, and the
kernel modules imported, the first time a kernel is resolved on a machine with a CUDA device."""
from __future__ import annotations

import torch

from .. import backend


def _status() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    from . import ext  # builds or loads the compiled library: only where a CUDA device is

    return ext.load_status()


def _load() -> None:
    from . import attention, kernels  # noqa: F401  (their @register / register() fill the registry)

    attention.register()


backend.declare("cuda", _status, _load)
