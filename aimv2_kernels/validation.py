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
