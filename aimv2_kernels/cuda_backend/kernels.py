"""The "cuda" backend: the compiled csrc/ kernels (ops `torch.ops.aimv2_kernels.cuda_<kernel>`) as
implementations of the kernels of the same name in the backend registry.

Imported by the package once `ext` has loaded the compiled library; the attention kernels, which
choose their compiled path by card, are in `attention`.
The kernels take float32, float16 and bfloat16; a call with another dtype (float64) runs the
reference instead, with a one-time warning. Each op's fake (meta) kernel is the reference
implementation itself, run on fake tensors: the output contract is the reference's by construction.
The exception is cuda_ce_rows, the in-place `rows` step of the linear-CE chunk driver (see its section).
"""
from __future__ import annotations

import warnings

import torch

from .. import backend
from ..linear_ce_chunks import ce_rows_torch, linear_ce_chunked

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
    """The "torch" implementation registered for `kernel` (by aimv2_kernels/torch_backend)."""
    return backend.fallback(kernel)


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


# ---- linear_ce: the shared chunk driver with the compiled rows op ---------------------------------
# cuda_ce_rows is not a functional kernel like those above: it is the `rows` step of the chunk driver
# (contract: ce_rows_torch), writing the caller's loss_out and dlogits_out (possibly the logits) and
# returning nothing. So "linear_ce" on this backend is the driver (cuBLAS GEMMs) calling it, and its
# fake kernel has no output to describe.

def _ce_rows_cuda(logits, bias, labels, ignore_index, scale, loss_out, dlogits_out) -> None:
    if logits.shape[0] > 0:
        torch.ops.aimv2_kernels.cuda_ce_rows(logits, bias, labels, ignore_index, scale, loss_out, dlogits_out)


@backend.register("linear_ce", "cuda")
def linear_ce_cuda(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params):
    rows = _ce_rows_cuda
    dtype = _unsupported_dtype((hidden, weight, bias))
    if dtype is not None:  # float64: the GEMMs still run on the GPU, the rows in PyTorch ops
        rows = ce_rows_torch
        if ("linear_ce", dtype) not in _warned:
            _warned.add(("linear_ce", dtype))
            warnings.warn(f"aimv2_kernels: the cuda backend's linear_ce rows take float32, float16 and bfloat16, "
                          f"not {dtype}; running the reference rows instead", stacklevel=2)
    return linear_ce_chunked(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params, rows)


@torch.library.register_fake("aimv2_kernels::cuda_ce_rows")
def _ce_rows_fake(logits, bias, labels, ignore_index, scale, loss_out, dlogits_out) -> None:
    """Only mutates its arguments (declared in the schema): no output, nothing to compute."""
    return None

