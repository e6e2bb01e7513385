"""The "cuda" backend's prefix-causal attention: the csrc/ kernels chosen by the card.

Two compiled paths implement the registry kernels `attention_fwd` and `attention_bwd`:
  * sm_90 (H100/H200): `cuda_attention_fwd_sm90` / `cuda_attention_bwd_sm90` (csrc/attention_sm90.cu:
    wgmma fed by TMA through an mbarrier pipeline, producer and consumer warpgroups), built for the
    arch-specific target sm_90a. Where the sm_90 backward is not built, the sm_80 backward serves.
  * sm_80 and newer (A100, and any card the sm_90 path does not cover): `cuda_attention_fwd_sm80` /
    `cuda_attention_bwd_sm80` (csrc/attention_sm80.cu: mma.sync tiles, cp.async double buffering).

Packed variable-length sequences (registry kernels `attention_varlen_fwd` / `attention_varlen_bwd`)
run `cuda_attention_varlen_fwd_sm80` / `cuda_attention_varlen_bwd_sm80` on every card, Hopper
included for now: the sm_80 kernels in their varlen mode, one launch for all sequences, each block
reading its sequence's bounds from cu_seqlens on the device.

Both take bf16/fp16 q, k, v with head dim 64 or 128 whose rows start on 16-byte boundaries (every
stride but the last a multiple of 8 elements, as TMA and cp.async need). Anything else (fp32, fp64,
another head dim, odd strides, a card below sm_80) runs the next backend in the explicit fallback
order (Triton, else the reference), with a one-time warning naming the reason; broadcast views
(stride 0) are made dense first. The package calls register() once the library has loaded.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import backend
from ..layouts import empty_grads

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)

_warned: set[str] = set()
# devices whose library build lacks the sm_90a code of the Hopper kernels (e.g. built for plain 9.0)
_no_sm90a: set[int] = set()
# devices where a Hopper call has run outside CUDA-graph capture: the library's one-time check for
# sm_90a code (a synchronous read, illegal while capturing) is done there
_sm90a_checked: set[int] = set()


def _compiled(name: str) -> Optional[Callable]:
    """torch.ops.aimv2_kernels.<name>, or None when this build of the library lacks it."""
    return getattr(torch.ops.aimv2_kernels, name, None)


def _aligned(t: Tensor) -> bool:
    element = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * element) % 16 == 0 for s in t.stride()[:-1])


def _broadcast(t: Tensor) -> bool:
    """True when a dim of more than one element has stride 0 (an expanded view, or autograd's dout of
    `.sum()`): TMA refuses stride 0, and a (0, 0, 0, 0) dout has no unit last stride either."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def kernel_layout(t: Tensor) -> Tensor:
    """`t` itself when the compiled kernels can read it, else a dense copy. Broadcast views are
    materialized (one copy of a tensor the caller never stored densely) rather than sent to a slower
    backend; other odd layouts of q, k, v are left to unsupported_reason, which routes them."""
    return t.contiguous() if _broadcast(t) or t.stride(-1) != 1 else t


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> Optional[str]:
    """Why the compiled attention cannot take these inputs, or None when it can."""
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"it takes float16 and bfloat16, not {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it takes head dims {HEAD_DIMS}, not {q.shape[-1]}"
    if not all(_aligned(t) for t in (q, k, v)):
        return "its loads need rows on 16-byte boundaries (strides that are multiples of 8 elements)"
    capability = torch.cuda.get_device_capability(q.device)
    if capability < (8, 0):
        return "it needs compute capability 8.0 or newer"
    if not _has_device_code(q.device):
        return (f"this build of the library has no device code for compute capability {capability[0]}.{capability[1]} "
                "(rebuild with TORCH_CUDA_ARCH_LIST naming it)")
    return None


_device_code: dict[int, bool] = {}


def _has_device_code(device: torch.device) -> bool:
    """Whether the library carries device code for this card (asked once per device; a library built
    before the query existed is taken to have it)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_code:
        query = _compiled("cuda_attention_sm80_has_code")
        _device_code[index] = True if query is None else bool(query(index))
    return _device_code[index]


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


# The sm_90 kernels launch one block row per (batch, head) pair in grid.y/z, at most 65535 each; the
# sm_80 grid has no such bound, so larger B or H go there.
SM90_MAX_GRID_YZ = 65535
# The sm_90 launcher's words when the library has no sm_90a device code (and only then: an error raised
# for any other reason, such as a first call made during CUDA-graph capture, must surface, not demote
# the device to the sm_80 kernels for good).
NO_SM90A_CODE = "has no sm_90a device code"


def _hopper_op(name: str, q: Tensor) -> Optional[Callable]:
    """The sm_90 op `name` when this card and build can run it on q, else None (use the sm_80 path)."""
    op = _compiled(name)
    if op is None or not _is_hopper(q.device) or q.device.index in _no_sm90a:
        return None
    if q.shape[0] > SM90_MAX_GRID_YZ or q.shape[1] > SM90_MAX_GRID_YZ:
        return None
    if q.device.index not in _sm90a_checked and torch.cuda.is_current_stream_capturing():
        return None  # the first Hopper call must not be captured: this one runs the sm_80 kernels
    return op


def _run_hopper(op: Callable, device: torch.device, args: tuple):
    """Call a Hopper op; a build without sm_90a device code says so once and is not asked again."""
    try:
        result = op(*args)
        _sm90a_checked.add(device.index)
        return result
    except RuntimeError as exc:
        if NO_SM90A_CODE not in str(exc):
            raise
        _no_sm90a.add(device.index)
        warnings.warn(f"aimv2_kernels: {exc}; using the sm_80 attention kernels on this card (rebuild with "
                      "TORCH_CUDA_ARCH_LIST=9.0a for the Hopper ones)", stacklevel=4)
        return None


def attention_fwd_cuda(q, k, v, prefix_len, causal, scale):
    if q.numel() == 0:  # B or H of 0: nothing to launch (a TMA descriptor of an empty dim cannot be built)
        B, H, S, D = q.shape
        return q.new_empty(B, S, H, D).transpose(1, 2), q.new_empty(B, H, S, dtype=torch.float32)
    q, k, v = (kernel_layout(t) for t in (q, k, v))
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return _fallback("attention_fwd", reason)(q, k, v, prefix_len, causal, scale)
    args = (q, k, v, prefix_len, causal, scale)
    sm90 = _hopper_op("cuda_attention_fwd_sm90", q)
    result = None if sm90 is None else _run_hopper(sm90, q.device, args)
    return result if result is not None else _compiled("cuda_attention_fwd_sm80")(*args)


def attention_bwd_cuda(dout, q, k, v, out, lse, prefix_len, causal, scale, grads=None):
    if q.numel() == 0:
        return empty_grads(q, k, v) if grads is None else grads
    q, k, v = (kernel_layout(t) for t in (q, k, v))
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return _fallback("attention_bwd", reason)(dout, q, k, v, out, lse, prefix_len, causal, scale, grads)
    grads = empty_grads(q, k, v) if grads is None else grads
    args = (_dense_dout(dout), q, k, v, out, lse, prefix_len, causal, scale, *grads)
    sm90 = _hopper_op("cuda_attention_bwd_sm90", q)
    # The backward op returns nothing; the device lands in _no_sm90a only when the Hopper call refused.
    # Its trailing `deterministic` picks the design: dQ by float32 atomics (5 GEMMs) unless asked.
    hopper_args = (*args, backend.deterministic_algorithms())
    if sm90 is None or (_run_hopper(sm90, q.device, hopper_args) is None and q.device.index in _no_sm90a):
        _compiled("cuda_attention_bwd_sm80")(*args)
    return grads


def _dense_dout(dout: Tensor) -> Tensor:
    """dout is autograd's (often a broadcast of `.sum()`'s scalar): any layout the kernels cannot read
    becomes one dense copy, never a slower backend for the whole backward."""
    return dout if _aligned(dout) and not _broadcast(dout) and dout.stride(-1) == 1 else dout.contiguous()


def _varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    """The varlen forward's (out, lse) from shapes alone, uninitialized: its fake kernel (the reference
    reads cu_seqlens' values) and the result of an empty call."""
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(H, T, dtype=torch.float32)


def attention_varlen_fwd_cuda(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    """q, k, v (T, H, D) packed sequences -> (out (T, H, D) contiguous, lse (H, T) float32)."""
    if q.numel() == 0:  # T or H of 0: nothing to launch
        return _varlen_fwd_fake(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)
    q, k, v = (kernel_layout(t) for t in (q, k, v))
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return _fallback("attention_varlen_fwd", reason)(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)
    return _compiled("cuda_attention_varlen_fwd_sm80")(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)


def _writable(t: Tensor) -> bool:
    """Whether the kernels can write gradient buffer t in place (rows off 16-byte boundaries are
    handled by the compiled op itself: it computes them aside and copies)."""
    return t.stride(-1) == 1 and not _broadcast(t)


def attention_varlen_bwd_cuda(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale,
                              grads=None):
    """-> (dq, dk, dv) (T, H, D): written into `grads` when given (e.g. the views of one packed
    (T, 3, H, D) buffer), else new tensors like q, k, v."""
    if q.numel() == 0:
        return empty_grads(q, k, v) if grads is None else grads
    q, k, v = (kernel_layout(t) for t in (q, k, v))
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        return _fallback("attention_varlen_bwd", reason)(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                         prefix_len, causal, scale, grads)
    grads = empty_grads(q, k, v) if grads is None else grads
    # A buffer the kernels cannot write (a last stride other than 1) gets a dense stand-in, copied back.
    targets = tuple(g if _writable(g) else torch.empty_like(g, memory_format=torch.contiguous_format)
                    for g in grads)
    _compiled("cuda_attention_varlen_bwd_sm80")(_dense_dout(dout), q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                prefix_len, causal, scale, *targets)
    for grad, target in zip(grads, targets):
        if target is not grad:
            grad.copy_(target)
    return grads


def register() -> None:
    """Register the kernels whose compiled ops this build has, with fake kernels for the ops. Called by
    the package once the library has loaded (not at import: a module imported before the library
    loads, by a test or a user, would otherwise never register)."""
    if _compiled("cuda_attention_fwd_sm80") is None or _compiled("cuda_attention_bwd_sm80") is None:
        return
    backend.register("attention_fwd", "cuda")(attention_fwd_cuda)
    backend.register("attention_bwd", "cuda")(attention_bwd_cuda)
    reference_fwd = backend.fallback("attention_fwd")
    for path in ("sm80", "sm90"):
        if _compiled(f"cuda_attention_fwd_{path}") is not None:
            torch.library.register_fake(f"aimv2_kernels::cuda_attention_fwd_{path}")(reference_fwd)
        if _compiled(f"cuda_attention_bwd_{path}") is not None:
            torch.library.register_fake(f"aimv2_kernels::cuda_attention_bwd_{path}")(lambda *args: None)
    if _compiled("cuda_attention_varlen_fwd_sm80") is None or _compiled("cuda_attention_varlen_bwd_sm80") is None:
        return
    backend.register("attention_varlen_fwd", "cuda")(attention_varlen_fwd_cuda)
    backend.register("attention_varlen_bwd", "cuda")(attention_varlen_bwd_cuda)
    torch.library.register_fake("aimv2_kernels::cuda_attention_varlen_fwd_sm80")(_varlen_fwd_fake)
    torch.library.register_fake("aimv2_kernels::cuda_attention_varlen_bwd_sm80")(lambda *args: None)

