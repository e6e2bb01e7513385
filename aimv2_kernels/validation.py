"""Input checks shared by every backend.

The functional API calls these before dispatch, so every backend sees inputs it supports and a user
gets an error that names the argument, the value and what was expected instead of a crash inside a
kernel. Checks here look only at metadata (dtype, device, shape), so they cost nothing under
torch.compile; checks of tensor *values* (negative prefix lengths) live in the op bodies.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Head dims the attention kernels are built for; the reference is held to the same contract so a
# model that runs on one backend runs on all.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, value, *, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim: int | None = None) -> None:
    """`value` is a tensor of one of `dtypes` with the expected number of dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` lives on `reference`'s device."""
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}; expected the same device")


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}; expected the same dtype")


def check_shape(name: str, value: torch.Tensor, expected: tuple, what: str = "") -> None:
    """`value.shape == expected` (entries of None in `expected` match any size)."""
    ok = value.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, value.shape))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {shown}{extra}, got {tuple(value.shape)}")


def check_last_dim_contiguous(name: str, value: torch.Tensor) -> None:
    if value.dim() > 0 and value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {value.stride()}")


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_head_dim(name: str, head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{name} has head dim {head_dim}; supported head dims are {SUPPORTED_HEAD_DIMS}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """Attention inputs: same shape (`layout`, e.g. "(B, H, S, D)"), rank, device and dtype, a
    contiguous last dim each, a supported head dim."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=layout.count(",") + 1)
        check_last_dim_contiguous(name, t)
    check_shape("k", k, tuple(q.shape), f"the shape of q: {layout}")
    check_shape("v", v, tuple(q.shape), f"the shape of q: {layout}")
    check_same_device("q", q, k=k, v=v)
    check_same_dtype("q", q, k=k, v=v)
    check_head_dim("q", q.shape[-1])


def attention_scale(causal, scale, head_dim: int) -> float:
    """An attention op's `causal` (a bool) checked, and its `scale` (None: head_dim ** -0.5, else a
    positive number) as a float."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = head_dim ** -0.5 if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


def prefix_tensor(prefix_len, count: int, device: torch.device, shape_name: str, what: str,
                  device_of: str = "q") -> torch.Tensor | None:
    """A public op's prefix_len (None, an int, or an integer tensor (count,)) as None or an integer
    tensor (count,) on `device`. shape_name ("B", "n"), what (one prefix length per ...) and
    device_of (the argument `device` is read from) word the errors."""
    if prefix_len is None:
        return None
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, torch.Tensor)):
        raise TypeError(f"prefix_len must be None, an int or an integer tensor of shape ({shape_name},), "
                        f"got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
        return torch.full((count,), prefix_len, dtype=torch.int32, device=device)
    check_tensor("prefix_len", prefix_len, dtypes=INDEX_DTYPES, ndim=1)
    check_shape("prefix_len", prefix_len, (count,), what)
    if prefix_len.device != device:
        raise ValueError(f"prefix_len is on {prefix_len.device} but {device_of} is on {device}; "
                         "expected the same device")
    return prefix_len


def check_prefix_values(prefix_len: torch.Tensor) -> None:
    """Prefix lengths must be >= 0. Runs inside op bodies (eager), never under tracing.

    On CPU this raises ValueError at once; on CUDA it enqueues an asynchronous device assert so the
    hot path never synchronizes with the host.
    """
    if prefix_len.numel() == 0:
        return
    if prefix_len.device.type == "cuda":
        torch._assert_async((prefix_len >= 0).all(), "prefix_len must be >= 0")
        return
    smallest = int(prefix_len.min())
    if smallest < 0:
        raise ValueError(f"prefix_len must be >= 0 for every sample, got a value of {smallest}")


def check_cu_seqlens(cu_seqlens, total: int, device: torch.device, device_of: str = "q") -> None:
    """Metadata of a varlen op's `cu_seqlens`: an int32 (n + 1,) tensor on `device`, that of the
    argument named `device_of`.

    int32 only, as FlashAttention's varlen ops take it: the kernels index with it directly. `total`
    (T, the number of tokens) is only named in the message; the values are checked in the op body.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32, got {str(cu_seqlens.dtype).replace('torch.', '')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must have shape (n + 1,) with n >= 0 sequences (0, ..., T = {total}), got {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {device_of} is on {device}; "
                         "expected the same device")


def check_max_seqlen(max_seqlen) -> None:
    """A Python int >= 0 (a SymInt under torch.compile): a kernel's grid size, so no host sync."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        raise TypeError(f"max_seqlen must be a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """cu_seqlens starts at 0, never decreases, ends at `total`; no sequence is longer than
    `max_seqlen`. Runs inside op bodies (eager), never under tracing.

    On CPU this raises ValueError at once. On CUDA the boundary checks are asynchronous device
    asserts, as for prefix_len, so the hot path never synchronizes with the host, max_seqlen's too: the
    Triton kernels size their grid by it, so a sequence longer than it would leave rows unwritten.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (n,)
    if cu_seqlens.device.type == "cuda":
        torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
        torch._assert_async(cu_seqlens[-1] == total, "cu_seqlens must end at T, the number of tokens")
        if lengths.numel():
            torch._assert_async((lengths >= 0).all(), "cu_seqlens must be non-decreasing")
            torch._assert_async((lengths <= max_seqlen).all(), "max_seqlen is below the longest sequence")
        return
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    if lengths.numel() and int(lengths.min()) < 0:
        s = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{s + 1}] = {int(cu_seqlens[s + 1])} "
            f"< cu_seqlens[{s}] = {int(cu_seqlens[s])}"
        )
    if last != total:
        raise ValueError(f"cu_seqlens must end at T = {total} (the number of tokens), got cu_seqlens[-1] = {last}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is below the longest sequence ({longest} tokens); expected max_seqlen >= {longest}")
