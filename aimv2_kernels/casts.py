"""Dtype casts that cost nothing when there is nothing to cast (a tiny call pays for every op)."""
from __future__ import annotations

import torch
from torch import Tensor


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the call when it already is."""
    return t if t.dtype == dtype else t.to(dtype)
