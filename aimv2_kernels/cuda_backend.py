"""The "cuda" backend: the compiled csrc/ kernels (ops `torch.ops.aimv2_kernels.cuda_<kernel>`) as
implementations of the kernels of the same name in the backend registry.

Imported by name by `aimv2_kernels.backend` once `cuda_ext` has loaded the compiled library (as the
triton kernels are), never directly.
The kernels take float32, float16 and bfloat16; a call with another dtype (float64) runs the
reference instead, with a one-time warning. Each op's fake (meta) kernel is the reference
implementation itself, run on fake tensors: the output contract is the reference's by construction.
"""
from __future__ import annotations

import warnings

import torch

from . import backend

# Kernels of the registry implemented by csrc/; kernel "k" is the op aimv2_kernels::cuda_k.
KERNELS = (
    "rms_norm_fwd",
    "rms_norm_residual_fwd",
    "rms_norm_bwd",
    "swiglu_fwd",
    "swiglu_bwd",
    "swiglu_packed_fwd",
    "swiglu_packed_bwd",
    "patch_mse_fwd",
    "patch_mse_bwd",
)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned: set[tuple[str, torch.dtype]] = set()


def _reference(kernel: str):
    """The "torch" implementation registered for `kernel` (by aimv2_kernels/ops)."""
    return backend._REGISTRY[kernel]["torch"]


def _unsupported_dtype(args: tuple) -> torch.dtype | None:
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype not in SUPPORTED_DTYPES:
            return arg.dtype
    return None


def _implementation(kernel: str):
    op = getattr(torch.ops.aimv2_kernels, f"cuda_{kernel}")
    reference = _reference(kernel)

    def run(*args):
        if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args):
            return reference(*args)  # nothing to compute; the reference defines the empty results
        dtype = _unsupported_dtype(args)
        if dtype is None:
            return op(*args)
        if (kernel, dtype) not in _warned:
            _warned.add((kernel, dtype))
            warnings.warn(f"aimv2_kernels: the cuda backend's {kernel} takes float32, float16 and bfloat16, "
                          f"not {dtype}; running the reference instead", stacklevel=3)
        return reference(*args)

    run.__name__ = f"{kernel}_cuda"
    run.__qualname__ = run.__name__
    return run


for _kernel in KERNELS:
    backend.register(_kernel, "cuda")(_implementation(_kernel))
    torch.library.register_fake(f"aimv2_kernels::cuda_{_kernel}")(_reference(_kernel))
