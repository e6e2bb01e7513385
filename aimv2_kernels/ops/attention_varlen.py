"""Prefix-causal attention over packed variable-length sequences, as custom ops.

q, k, v are (T, H, D): the tokens of n sequences back to back, sequence s being tokens
cu_seqlens[s] .. cu_seqlens[s + 1] - 1. Inside a sequence the padded op's rule holds (key j visible
to query i iff (not causal) or j <= i or j < prefix_len[s], positions counted from the sequence
start); nothing is visible across sequences. The output is (T, H, D), contiguous.

Backends: "triton" (triton_backend/attention_varlen.py: the padded kernels with VARLEN=True, one
launch over all sequences), which CUDA tensors get under "triton" and "auto"; "cuda"
(cuda_backend/attention.py: the csrc/ sm_80 kernels in their varlen mode, also one launch over all
sequences); and "torch" (torch_backend/attention_varlen.py: the padded op's math on the sequences
zero-padded into one batch; the reference in reference.py loops over sequences), for CPU tensors
outside the interpreter. All keep lse as (H, T).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve
from .attention import check_prefix
from .autograd import call, register_autograd
from ..validation import (
    attention_scale,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_max_seqlen,
    check_qkv,
    prefix_tensor,
)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- custom ops ----------------------------------------------------------------------------------

# Each op's body is a plain function too: the eager fast path calls it directly (see autograd.py).

def _attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                      prefix_len: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out (T, H, D), lse (H, T) float32, float64 for float64 inputs)."""
    check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
    if prefix_len is not None:
        check_prefix(prefix_len)
    return resolve("attention_varlen_fwd", q.device, q)[1](q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)


attention_varlen_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_varlen",
                                              mutates_args=())(_attention_varlen)


@attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(H, T, dtype=_lse_dtype(q))


def _attention_varlen_backward_body(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                    cu_seqlens: Tensor, max_seqlen: int, prefix_len: Optional[Tensor],
                                    causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    impl = resolve("attention_varlen_bwd", q.device, q)[1]
    return impl(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale)


attention_varlen_backward_op = torch.library.custom_op("aimv2_kernels::prefix_causal_attention_varlen_backward",
                                                       mutates_args=())(_attention_varlen_backward_body)


@attention_varlen_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_attention_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale = inputs
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
    ctx.save_for_backward(q, k, v, cu_seqlens, prefix_len, output[0], output[1])


def _attention_varlen_backward(ctx, dout, _dlse):
    if dout is None:  # only lse was used (gradients are not materialized: see autograd.py)
        return (None,) * 8
    q, k, v, cu_seqlens, prefix_len, out, lse = ctx.saved_tensors
    dq, dk, dv = call(attention_varlen_backward_op, _attention_varlen_backward_body, dout, q, k, v, out, lse,
                      cu_seqlens, ctx.max_seqlen, prefix_len, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_attention_varlen_call = register_autograd(attention_varlen_op, _attention_varlen, _attention_varlen_backward,
                                           _setup_attention_varlen)


# ---- functional API ------------------------------------------------------------------------------

def _prefix_tensor(prefix_len, n: int, device: torch.device) -> Optional[Tensor]:
    """None, an int, or an integer tensor (n,) -> None or an int tensor (n,) on `device`."""
    return prefix_tensor(prefix_len, n, device, "n", "one prefix length per sequence: len(cu_seqlens) - 1")


def prefix_causal_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                   prefix_len=None, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Prefix-causal attention inside each of n packed sequences, nothing visible across them.

    q, k, v: (T, H, D) with a contiguous last dim (any other strides: the views of a packed (T, 3, H, D)
    projection need no copy). cu_seqlens: int32 (n + 1,) on q's device, 0 = cu_seqlens[0] <= ... <=
    cu_seqlens[n] = T; empty sequences are allowed. max_seqlen: a Python int >= the longest sequence
    (given, so no kernel has to read cu_seqlens on the host). prefix_len: None, an int, or an int
    tensor (n,); values beyond a sequence's length make all of it visible. scale defaults to
    D ** -0.5. Returns (T, H, D).
    """
    check_qkv(q, k, v, "(T, H, D)")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    check_max_seqlen(max_seqlen)
    scale = attention_scale(causal, scale, q.shape[-1])
    prefix = _prefix_tensor(prefix_len, cu_seqlens.shape[0] - 1, q.device)
    return _attention_varlen_call(q, k, v, cu_seqlens, max_seqlen, prefix if causal else None, causal, scale)[0]
