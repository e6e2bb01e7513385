"""The "cuda" backend's prefix-causal attention: the csrc/ kernels chosen by the card.

Two compiled paths implement the registry kernels `attention_fwd` and `attention_bwd`:
  * sm_90 (H100/H200): `cuda_attention_fwd_sm90` / `cuda_attention_bwd_sm90` (csrc/attention_sm90.cu:
    wgmma fed by TMA through an mbarrier pipeline, producer and consumer warpgroups), built for the
    arch-specific target sm_90a. Where the sm_90 backward is not built, the sm_80 backward serves.
  * sm_80 and newer (A100, and any card the sm_90 path does not cover): `cuda_attention_fwd_sm80` /
    `cuda_attention_bwd_sm80` (csrc/attention_sm80.cu: mma.sync tiles, cp.async double buffering).

Both take bf16/fp16 q, k, v with head dim 64 or 128 whose rows start on 16-byte boundaries (every
stride but the last a multiple of 8 elements, as TMA and cp.async need). Anything else (fp32, fp64,
another head dim, odd strides, a card below sm_80) runs the next backend in the explicit fallback
order (Triton, else the reference), with a one-time warning naming the reason. Imported by
cuda_backend once the library has loaded.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import backend
from .ops.attention import empty_grads

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)

_warned: set[str] = set()
# devices whose library build lacks the sm_90a code of the Hopper kernels (e.g. built for plain 9.0)
_no_sm90a: set[int] = set()


def _compiled(name: str) -> Optional[Callable]:
    """torch.ops.aimv2_kernels.<name>, or None when this build of the library lacks it."""
    return getattr(torch.ops.aimv2_kernels, name, None)


def _aligned(t: Tensor) -> bool:
    element = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * element) % 16 == 0 for s in t.stride()[:-1])


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the compiled attention cannot take these inputs, or None when it can."""
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"it takes float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it takes head dims {HEAD_DIMS}, not {q.shape[-1]}"
    if not all(_aligned(t) for t in (q, k, v)):
        return "its loads need rows on 16-byte boundaries (strides that are multiples of 8 elements)"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return "it needs compute capability 8.0 or newer"
    return None


def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def _fallback(kernel: str, reason: str) -> Callable:
    """The next backend's implementation of `kernel` (Triton when it can run, else the reference)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"aimv2_kernels: the cuda backend's attention cannot run this call ({reason}); running "
                      f"the next backend instead", stacklevel=4)
    impls = backend._REGISTRY[kernel]
    if "triton" in impls and backend.unavailable_reason("triton") is None:
        return impls["triton"]
    return impls["torch"]


def _hopper_op(name: str, device: torch.device) -> Optional[Callable]:
    """The sm_90 op `name` when this card and build can run it, else None (use the sm_80 path)."""
    op = _compiled(name)
    if op is None or not _is_hopper(device) or device.index in _no_sm90a:
        return None
    return op


def _run_hopper(op: Callable, device: torch.device, args: tuple):
    """Call a Hopper op; a build without sm_90a device code says so once and is not asked again."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if "sm_90a" not in str(exc):
            raise
        _no_sm90a.add(device.index)
        warnings.warn(f"aimv2_kernels: {exc}; using the sm_80 attention kernels on this card (rebuild with "
                      "TORCH_CUDA_ARCH_LIST=9.0a for the Hopper ones)", stacklevel=4)
        return None


def attention_fwd_cuda(q, k, v, prefix_len, causal, scale):
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return _fallback("attention_fwd", reason)(q, k, v, prefix_len, causal, scale)
    args = (q, k, v, prefix_len, causal, scale)
    sm90 = _hopper_op("cuda_attention_fwd_sm90", q.device)
    result = None if sm90 is None else _run_hopper(sm90, q.device, args)
    return result if result is not None else torch.ops.aimv2_kernels.cuda_attention_fwd_sm80(*args)


def attention_bwd_cuda(dout, q, k, v, out, lse, prefix_len, causal, scale, grads=None):
    reason = unsupported_reason(q, k, v)
    if reason is None and not _aligned(dout):
        reason = "its loads need rows on 16-byte boundaries (the output gradient's strides)"
    if reason is not None:
        return _fallback("attention_bwd", reason)(dout, q, k, v, out, lse, prefix_len, causal, scale, grads)
    grads = empty_grads(q, k, v) if grads is None else grads
    args = (dout, q, k, v, out, lse, prefix_len, causal, scale, *grads)
    sm90 = _hopper_op("cuda_attention_bwd_sm90", q.device)
    # The backward op returns nothing; the device lands in _no_sm90a only when the Hopper call refused.
    if sm90 is None or (_run_hopper(sm90, q.device, args) is None and q.device.index in _no_sm90a):
        torch.ops.aimv2_kernels.cuda_attention_bwd_sm80(*args)
    return grads


def _register() -> None:
    """Register the kernels whose compiled ops this build has, with fake kernels for the ops."""
    if _compiled("cuda_attention_fwd_sm80") is None or _compiled("cuda_attention_bwd_sm80") is None:
        return
    backend.register("attention_fwd", "cuda")(attention_fwd_cuda)
    backend.register("attention_bwd", "cuda")(attention_bwd_cuda)
    reference_fwd = backend._REGISTRY["attention_fwd"]["torch"]
    for path in ("sm80", "sm90"):
        if _compiled(f"cuda_attention_fwd_{path}") is not None:
            torch.library.register_fake(f"aimv2_kernels::cuda_attention_fwd_{path}")(reference_fwd)
        if _compiled(f"cuda_attention_bwd_{path}") is not None:
            torch.library.register_fake(f"aimv2_kernels::cuda_attention_bwd_{path}")(lambda *args: None)


_register()
