"""Loading of the compiled csrc/ extension (`aimv2_kernels._C`) behind the "cuda" backend."""
from __future__ import annotations

import functools


@functools.cache
def load_status() -> str | None:
    """None when the extension is loaded (its kernels registered), else why it is not."""
    try:
        from aimv2_kernels import _C  # noqa: F401
    except ImportError as exc:
        return f"the compiled extension aimv2_kernels._C is not built ({exc})"
    return None
