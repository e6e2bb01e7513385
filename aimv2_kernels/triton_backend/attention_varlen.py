"""Prefix-causal attention over packed variable-length sequences: the "triton" backend's launchers.

No kernels of their own: the padded forward and backward kernels (attention_fwd.py, attention_bwd.py)
run with VARLEN=True, where the "batch" program coordinate is the sequence index s, each program
reads its sequence's start and length from cu_seqlens and its prefix from prefix_len[s], and every
row address is offset by start * token_stride (see `program_coords` in attention.py). The tile
classification, masks and loops are the padded ones with S = the sequence's length, so the two ops
share every device helper.

One launch per kernel covers all sequences: the grid is n * H * cdiv(max_seqlen, BLOCK), programs
whose tile starts past their sequence's end return at once. Lengths, boundaries and prefixes are read
from device memory, so new batches never recompile and nothing syncs with the host; max_seqlen sizes
the grid and picks the autotuning S bucket.

The row statistics (lse, delta) are (H, T) fp32, the layout of the "torch" backend
(ops/attention_varlen.py), so either backend's forward pairs with either backward. The delta
preprocess (and the atomic path's dQ conversion) needs no VARLEN: it is row-wise, so it runs as the
padded kernel on the packed tokens seen as one (1, H, T, D) sample.
"""
from __future__ import annotations

import torch
import triton

from ..backend import deterministic_algorithms, fallback, register
from .kernel_config import KernelConfig
from . import attention_bwd, attention_fwd
from .attention import (
    LOG2E,
    MAX_BLOCK_ROWS,
    PREPROCESS_BLOCK_M,
    AIMV2_CASES,
    TABLE_CAPABILITIES,
    candidate_configs,
    dot_precision,
    kernel_config,
    launch,
    prefix_argument,
    s_bucket,
    unit_last_stride,
    unsupported_reason,
    warn_fallback_once,
)
from .common import device_context, poison


def _token_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(T, H, D) view -> the kernels' (batch, head, row) strides: with VARLEN the batch offset is the
    sequence's first token, so the batch stride is the token stride, as is the row stride."""
    return t.stride(0), t.stride(1), t.stride(0)


def _long_rows(max_seqlen: int, *tensors: torch.Tensor) -> bool:
    """LONG_ROWS for (T, H, D) tensors: row offsets inside one sequence (up to max_seqlen + a tile)
    times the token stride; the sequence's start offset is always int64 (program_coords)."""
    return (max_seqlen + MAX_BLOCK_ROWS) * max(abs(t.stride(0)) for t in tensors) >= 2**31


def attention_varlen_forward(q, k, v, cu_seqlens, max_seqlen: int, prefix_len, causal: bool, scale: float):
    """q, k, v (T, H, D) -> (out (T, H, D) contiguous, lse (H, T) fp32)."""
    T, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    out = torch.empty(T, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(H, T, device=q.device, dtype=torch.float32)
    poison(out, lse)
    if T == 0:  # then max_seqlen may be 0 too: an empty grid, nothing to launch
        return out, lse
    prefix = prefix_argument(prefix_len, causal)
    cu = cu_seqlens.contiguous()  # the kernels read cu[s] and cu[s + 1] by element index
    args = (
        q, k, v, out, lse, prefix, cu,
        *_token_strides(q), *_token_strides(k), *_token_strides(v), *_token_strides(out),
        H, max_seqlen, T, s_bucket(max_seqlen), scale * LOG2E,
    )
    meta = dict(HAS_PREFIX=prefix is not None, CAUSAL=causal, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype),
                LONG_ROWS=_long_rows(max_seqlen, q, k, v, out), VARLEN=True)
    with device_context(q):
        launch(attention_fwd.attention_fwd_kernel, "fwd", lambda c: (n * H * triton.cdiv(max_seqlen, c["BLOCK_M"]),),
               q, args, meta)
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen: int, prefix_len, causal: bool,
                              scale: float, grads=None):
    """-> (dq, dk, dv) (T, H, D): written into `grads` when given (the views of one packed (T, 3, H, D)
    buffer; any strides with a unit last stride, which the kernels take as token strides), else each
    allocated like its input (as the unpacked op's fake kernel). The padded backward's two designs
    (attention_bwd.py), chosen the same way."""
    T, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    dout, out = unit_last_stride(dout), unit_last_stride(out)
    dq, dk, dv = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)) if grads is None else grads
    delta = torch.empty(H, T, device=q.device, dtype=torch.float32)
    atomic = not deterministic_algorithms()
    dq_acc = torch.empty(T, H, D, device=q.device, dtype=torch.float32) if atomic else None
    poison(dq, dk, dv, delta, dq_acc)
    if T == 0:
        return dq, dk, dv
    lse = lse.contiguous()  # (H, T), indexed as head * T + token
    prefix = prefix_argument(prefix_len, causal)
    cu = cu_seqlens.contiguous()
    strides = (*_token_strides(q), *_token_strides(k), *_token_strides(v), *_token_strides(dout))
    acc_strides = _token_strides(dq_acc) if atomic else (0, 0, 0)
    common = (H, max_seqlen, T, s_bucket(max_seqlen), scale, scale * LOG2E)
    long_offsets = _long_rows(max_seqlen, q, k, v, dout, dq, dk, dv, *([dq_acc] if atomic else []))
    meta = dict(HAS_PREFIX=prefix is not None, CAUSAL=causal, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype),
                LONG_ROWS=long_offsets, VARLEN=True)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, dq_acc, prefix, cu, *strides, *_token_strides(dk), *_token_strides(dv),
                 *acc_strides, *common)
    # The row-wise passes run as the padded kernels over one sample of T rows, (0, head, token)
    # strides; their rows span all T tokens, hence T (not max_seqlen) for the int64 decision.
    rows_grid = (H * triton.cdiv(T, PREPROCESS_BLOCK_M),)
    acc_rows = (0, dq_acc.stride(1), dq_acc.stride(0)) if atomic else (0, 0, 0)
    row_long = _long_rows(T, out, dout, dq, *([dq_acc] if atomic else []))
    with device_context(q):
        # delta (H, T) = rowsum(dO * O), and the dQ accumulator zeroed
        attention_bwd.attention_bwd_preprocess_kernel[rows_grid](
            out, dout, delta, dq_acc, 0, out.stride(1), out.stride(0), 0, dout.stride(1), dout.stride(0), *acc_rows, H, T,
            HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M, LONG_ROWS=row_long, ZERO_DQ=atomic)
        # dK/dV (with atomics dQ too): one program per (sequence, head, key block)
        launch(attention_bwd.attention_bwd_dkdv_kernel, "bwd" if atomic else "dkdv",
               lambda c: (n * H * triton.cdiv(max_seqlen, c["BLOCK_N"]),), q, dkdv_args, {**meta, "ATOMIC_DQ": atomic})
        if atomic:
            attention_bwd.attention_bwd_dq_convert_kernel[rows_grid](
                dq_acc, dq, *acc_rows, 0, dq.stride(1), dq.stride(0), H, T, scale, HEAD_DIM=D,
                BLOCK_M=PREPROCESS_BLOCK_M, LONG_ROWS=row_long)
        else:  # dQ: one program per (sequence, head, query tile)
            dq_args = (q, k, v, dout, lse, delta, dq, prefix, cu, *strides, *_token_strides(dq), *common)
            launch(attention_bwd.attention_bwd_dq_kernel, "dq",
                   lambda c: (n * H * triton.cdiv(max_seqlen, c["BLOCK_M"]),), q, dq_args, meta)
    return dq, dk, dv


@register("attention_varlen_fwd", "triton")
def _attention_varlen_fwd_triton(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    reason = unsupported_reason(q)
    if reason is not None:
        warn_fallback_once(reason)
        return fallback("attention_varlen_fwd")(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)
    return attention_varlen_forward(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale)


@register("attention_varlen_bwd", "triton")
def _attention_varlen_bwd_triton(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale,
                                 grads=None):
    reason = unsupported_reason(q)
    if reason is not None:
        warn_fallback_once(reason)
        return fallback("attention_varlen_bwd")(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len,
                                                causal, scale, grads)
    return attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale,
                                     grads)


# ---- compile check -------------------------------------------------------------------------------

def compile_configs() -> list[KernelConfig]:
    """The VARLEN variants at the first candidate of each kernel for each arch's table, bf16, D = 128
    (the AIMv2 head dim; packed native-resolution encoders with a per-image prefix, decoders plain
    causal): hot, so a spill or duplicated dot work fails the check. The row-wise passes are the
    padded kernels, checked with them."""
    configs = [kernel_config("attention_varlen_fwd", attention_fwd.attention_fwd_kernel,
                             attention_fwd._signature("*bf16", has_prefix, varlen=True), 128,
                             case.split(" S=")[0], has_prefix, candidate_configs("fwd", 128, capability)[0], True,
                             varlen=True, arch=arch)
               for case, has_prefix in AIMV2_CASES for arch, capability in TABLE_CAPABILITIES.items()]
    configs += [attention_bwd.kernel_entry(kernel, 128, case.split(" S=")[0], has_prefix,
                                           candidate_configs(kernel, 128, capability)[0], True, arch, varlen=True,
                                           op="attention_varlen")
                for kernel in attention_bwd.KERNEL_FUNCTIONS for case, has_prefix in AIMV2_CASES
                for arch, capability in TABLE_CAPABILITIES.items()]
    return configs
