"""Prefix-causal flash attention, backward: dQ, dK, dV from the saved lse, without an S x S matrix.

With P = exp(s - lse) recomputed per tile (s = q k^T * scale), dP = dO v^T and
delta_i = rowsum(dO * O)_i = rowsum(P * dP)_i:
    dV = P^T dO,   dS = P * (dP - delta),   dQ = scale * dS k,   dK = scale * dS^T q.
Two designs, chosen per call (`attention_backward`):
  * atomic (default), 5 GEMMs per (query tile, key block) pair: the dK/dV kernel also forms
    dS^T's contribution to dQ and adds it with float32 atomics into a (B, H, S, D) accumulator, as
    FlashAttention-2/3 do. The order of those adds varies run to run, so dQ may differ in its last
    bits. Launches: preprocess (delta, and the accumulator zeroed), the dK/dV/dQ kernel, a convert
    pass (dQ = scale * accumulator, cast).
  * deterministic, 7 GEMMs: a separate dQ kernel recomputes S and dP for its query tile and owns its
    rows, no atomics. Runs when `deterministic_algorithms()` says so (PyTorch's switch or
    AIMV2_KERNELS_DETERMINISTIC=1). Launches: preprocess, dK/dV, dQ.
The kernels:
  * preprocess: delta (B, H, S) fp32 (and the zeroed dQ accumulator).
  * dK/dV: one program per key block; loops over the query blocks that can see it (a skipped range,
    a masked boundary range, a fully visible range, see attention.py) accumulating both in fp32.
  * dQ: one program per query tile; loops over visible key blocks exactly like the forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import deterministic_algorithms, fallback, register
from .kernel_config import KernelConfig
from ..layouts import empty_grads
from .attention import (
    FP32_HEAD_DIMS,
    AIMV2_CASES,
    KERNEL_HEAD_DIMS,
    TABLE_CAPABILITIES,
    aligned_args,
    LOG2E,
    LOG2E_DEVICE,
    PREPROCESS_BLOCK_M,
    candidate_configs,
    dot_precision,
    kernel_config,
    launch,
    load_rows,
    long_rows,
    prefix_argument,
    program_coords,
    row_ptrs,
    key_ranges,
    query_ranges,
    s_bucket,
    unit_last_stride,
    unsupported_reason,
    visibility,
    warn_fallback_once,
)
from .common import device_context, poison


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO,  # (B, H, S, D)
    DELTA,  # (B, H, S) fp32 output: rowsum(dO * O)
    DQ_ACC,  # ZERO_DQ: (B, H, S, D) fp32 dQ accumulator, zeroed here; else None
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_ab, stride_ah, stride_as,  # DQ_ACC's (0 without it)
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    LONG_ROWS: tl.constexpr,  # int64 row offsets (see row_ptrs)
    ZERO_DQ: tl.constexpr,  # zero DQ_ACC's rows too: saves the atomic path a memset launch
):
    off_b, off_h, m0, _, _, stats_row = program_coords(None, None, S, None, H, BLOCK_M, False, False, False, False)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = load_rows(O + off_b * stride_ob + off_h * stride_oh, stride_os, offs_m, offs_d, S, True, LONG_ROWS)  # (BLOCK_M, D)
    do = load_rows(DO + off_b * stride_dob + off_h * stride_doh, stride_dos, offs_m, offs_d, S, True, LONG_ROWS)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + stats_row + offs_m, delta, mask=offs_m < S)
    if ZERO_DQ:
        acc_ptrs = row_ptrs(DQ_ACC + off_b * stride_ab + off_h * stride_ah, stride_as, offs_m, offs_d, LONG_ROWS)
        tl.store(acc_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=offs_m[:, None] < S)


@triton.jit
def attention_bwd_dq_convert_kernel(
    DQ_ACC,  # (B, H, S, D) fp32, unscaled sum of dS k
    DQ,  # (B, H, S, D) output
    stride_ab, stride_ah, stride_as,
    stride_qb, stride_qh, stride_qs,
    H, S, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, LONG_ROWS: tl.constexpr,
):
    """The atomic path's last pass: dQ = sm_scale * accumulator, in dQ's dtype and strides."""
    off_b, off_h, m0, _, _, _ = program_coords(None, None, S, None, H, BLOCK_M, False, False, False, False)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = load_rows(DQ_ACC + off_b * stride_ab + off_h * stride_ah, stride_as, offs_m, offs_d, S, True, LONG_ROWS)
    dq_ptrs = row_ptrs(DQ + off_b * stride_qb + off_h * stride_qh, stride_qs, offs_m, offs_d, LONG_ROWS)
    tl.store(dq_ptrs, (acc * sm_scale).to(DQ.dtype.element_ty), mask=offs_m[:, None] < S)


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_acc_base, stride_qs, stride_dos, stride_as,
                     offs_n, offs_d, start, end, prefix, S, qk_scale,
                     MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     LONG_ROWS: tl.constexpr, EVEN_S: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, D) of one key block over query blocks [start, end); with ATOMIC_DQ
    also add this key block's share of dQ (unscaled) to the float32 accumulator. Works in the
    transposed orientation (keys x queries) so the accumulators need no transpose. Query rows past S
    load as zeros (q = dO = 0, hence dS = 0), so they add nothing even unmasked; their dQ rows are
    not written."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0  # (BLOCK_M,) query positions
        row_ok = offs_m < S
        q = load_rows(q_base, stride_qs, offs_m, offs_d, S, not EVEN_S, LONG_ROWS)  # (BLOCK_M, D)
        do = load_rows(do_base, stride_dos, offs_m, offs_d, S, not EVEN_S, LONG_ROWS)
        if EVEN_S:
            lse2 = tl.load(lse_base + offs_m) * LOG2E_DEVICE  # (BLOCK_M,), log2 units
            delta = tl.load(delta_base + offs_m)
        else:
            lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * LOG2E_DEVICE
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(visibility(offs_m[None, :], offs_n[:, None], prefix), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, D) fp32
            dq_ptrs = row_ptrs(dq_acc_base, stride_as, offs_m, offs_d, LONG_ROWS)
            # relaxed: the adds only need to be atomic; nothing reads the accumulator before the
            # kernel ends, so no ordering (fences) is paid for.
            if EVEN_S:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["S_BUCKET"])
def attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, S, D), last dim contiguous
    LSE, DELTA,  # (B, H, S) fp32
    DK, DV,  # (B, H, S, D) outputs
    DQ_ACC,  # ATOMIC_DQ: (B, H, S, D) fp32 dQ accumulator, zeroed; else None
    PREFIX,  # (B,) int32/int64 prefix lengths, or None when HAS_PREFIX is False
    CU_SEQLENS,  # VARLEN: (n + 1,) int32 sequence boundaries; else None
    stride_qb, stride_qh, stride_qs,  # VARLEN: (token, head, token) strides of the (T, H, D) views
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_ab, stride_ah, stride_as,  # DQ_ACC's (0 without it)
    H, S,  # VARLEN: S = max_seqlen, which only sizes the grid
    T,  # VARLEN: total tokens (LSE, DELTA are (H, T)); else None
    S_BUCKET,  # autotuning key only
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LONG_ROWS: tl.constexpr,  # int64 row offsets (see row_ptrs)
    VARLEN: tl.constexpr,  # packed sequences: every tensor is (T, H, D), see program_coords
    EVEN_S: tl.constexpr,  # S is a multiple of both tiles: no bounds masks (attention.even_s)
    ATOMIC_DQ: tl.constexpr,  # the 5-GEMM design: dQ added to DQ_ACC here (see the module docstring)
):
    # Key blocks in natural order: the early ones, seen by the most queries, start first. From here
    # on S is this sample's (sequence's) length.
    off_b64, off_h64, n0, prefix, S, stats_row = program_coords(PREFIX, CU_SEQLENS, S, T, H, BLOCK_N, False,
                                                                HAS_PREFIX, CAUSAL, VARLEN)
    if VARLEN:
        if n0 >= S:  # the grid is sized for max_seqlen: this sequence has no keys here
            return
    q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
    do_base = DO + off_b64 * stride_dob + off_h64 * stride_doh
    lse_base = LSE + stats_row
    delta_base = DELTA + stats_row
    dq_acc_base = DQ_ACC
    if ATOMIC_DQ:
        dq_acc_base = DQ_ACC + off_b64 * stride_ab + off_h64 * stride_ah

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k = load_rows(K + off_b64 * stride_kb + off_h64 * stride_kh, stride_ks, offs_n, offs_d, S, not EVEN_S, LONG_ROWS)  # (BLOCK_N, D)
    v = load_rows(V + off_b64 * stride_vb + off_h64 * stride_vh, stride_vs, offs_n, offs_d, S, not EVEN_S, LONG_ROWS)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo, full_start = query_ranges(n0, prefix, S, BLOCK_M, BLOCK_N)
    dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_acc_base, stride_qs, stride_dos,
                              stride_as, offs_n, offs_d, lo, tl.minimum(full_start, S), prefix, S, qk_scale, True, BLOCK_M,
                              DOT_PRECISION, LONG_ROWS, EVEN_S, ATOMIC_DQ)
    dk, dv = _dkdv_query_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_acc_base, stride_qs, stride_dos,
                              stride_as, offs_n, offs_d, full_start, S, prefix, S, qk_scale, False, BLOCK_M,
                              DOT_PRECISION, LONG_ROWS, EVEN_S, ATOMIC_DQ)

    dk_ptrs = row_ptrs(DK + off_b64 * stride_dkb + off_h64 * stride_dkh, stride_dks, offs_n, offs_d, LONG_ROWS)
    dv_ptrs = row_ptrs(DV + off_b64 * stride_dvb + off_h64 * stride_dvh, stride_dvs, offs_n, offs_d, LONG_ROWS)
    if EVEN_S:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < S)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < S)


@triton.jit
def _dq_key_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, start, end,
                 prefix, S, qk_scale,
                 MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, LONG_ROWS: tl.constexpr,
                 EVEN_S: tl.constexpr):
    """Accumulate dQ (BLOCK_M, D) of one query tile over key blocks [start, end); MASKED=False only
    for blocks inside S visible to the whole tile (as in the forward)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0  # (BLOCK_N,) key positions
        k = load_rows(k_base, stride_ks, cols, offs_d, S, MASKED and not EVEN_S, LONG_ROWS)  # (BLOCK_N, D)
        v = load_rows(v_base, stride_vs, cols, offs_d, S, MASKED and not EVEN_S, LONG_ROWS)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(visibility(offs_m[:, None], cols[None, :], prefix), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["S_BUCKET"])
def attention_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, S, D), last dim contiguous
    LSE, DELTA,  # (B, H, S) fp32
    DQ,  # (B, H, S, D) output
    PREFIX,  # (B,) int32/int64 prefix lengths, or None when HAS_PREFIX is False
    CU_SEQLENS,  # VARLEN: (n + 1,) int32 sequence boundaries; else None
    stride_qb, stride_qh, stride_qs,  # VARLEN: (token, head, token) strides of the (T, H, D) views
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    H, S,  # VARLEN: S = max_seqlen, which only sizes the grid
    T,  # VARLEN: total tokens (LSE, DELTA are (H, T)); else None
    S_BUCKET,  # autotuning key only
    sm_scale,  # softmax scale
    qk_scale,  # sm_scale * log2(e)
    HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LONG_ROWS: tl.constexpr,  # int64 row offsets (see row_ptrs)
    VARLEN: tl.constexpr,  # packed sequences: every tensor is (T, H, D), see program_coords
    EVEN_S: tl.constexpr,  # S is a multiple of both tiles: no bounds masks (attention.even_s)
):
    # From here on S is this sample's (sequence's) length.
    off_b64, off_h64, m0, prefix, S, stats_row = program_coords(PREFIX, CU_SEQLENS, S, T, H, BLOCK_M, True,
                                                                HAS_PREFIX, CAUSAL, VARLEN)
    if VARLEN:
        if m0 >= S:  # the grid is sized for max_seqlen: this sequence has no rows here
            return
    k_base = K + off_b64 * stride_kb + off_h64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_h64 * stride_vh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S
    q = load_rows(Q + off_b64 * stride_qb + off_h64 * stride_qh, stride_qs, offs_m, offs_d, S, not EVEN_S, LONG_ROWS)  # (BLOCK_M, D)
    do = load_rows(DO + off_b64 * stride_dob + off_h64 * stride_doh, stride_dos, offs_m, offs_d, S, not EVEN_S, LONG_ROWS)
    if EVEN_S:
        lse2 = tl.load(LSE + stats_row + offs_m) * LOG2E_DEVICE
        delta = tl.load(DELTA + stats_row + offs_m)
    else:
        lse2 = tl.load(LSE + stats_row + offs_m, mask=row_ok, other=0.0) * LOG2E_DEVICE
        delta = tl.load(DELTA + stats_row + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = key_ranges(m0, prefix, S, BLOCK_M, BLOCK_N)
    dq = _dq_key_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                      0, full_end, prefix, S, qk_scale, False, BLOCK_N, DOT_PRECISION, LONG_ROWS, EVEN_S)
    dq = _dq_key_loop(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                      full_end, hi, prefix, S, qk_scale, True, BLOCK_N, DOT_PRECISION, LONG_ROWS, EVEN_S)
    dq_ptrs = row_ptrs(DQ + off_b64 * stride_dqb + off_h64 * stride_dqh, stride_dqs, offs_m, offs_d, LONG_ROWS)
    if EVEN_S:
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---- launcher ------------------------------------------------------------------------------------

def attention_backward(dout, q, k, v, out, lse, prefix_len, causal: bool, scale: float, grads=None):
    """-> (dq, dk, dv): written into `grads` when given (views of one packed buffer, any strides with a
    unit last stride), else allocated like the inputs (empty_grads, as the op's fake kernel). The
    atomic design unless `deterministic_algorithms()` (module docstring)."""
    B, H, S, D = q.shape
    dout, out = unit_last_stride(dout), unit_last_stride(out)
    dq, dk, dv = empty_grads(q, k, v) if grads is None else grads
    delta = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    atomic = not deterministic_algorithms()
    dq_acc = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32) if atomic else None
    poison(dq, dk, dv, delta, dq_acc)
    prefix = prefix_argument(prefix_len, causal)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    acc_strides = dq_acc.stride()[:3] if atomic else (0, 0, 0)
    common = (H, S, None, s_bucket(S), scale, scale * LOG2E)
    long_offsets = long_rows(S, q, k, v, dout, out, dq, dk, dv, *([dq_acc] if atomic else []))
    meta = dict(HAS_PREFIX=prefix is not None, CAUSAL=causal, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype),
                LONG_ROWS=long_offsets, VARLEN=False)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, dq_acc, prefix, None, *strides, *dk.stride()[:3], *dv.stride()[:3],
                 *acc_strides, *common)
    preprocess_grid = (B * H * triton.cdiv(S, PREPROCESS_BLOCK_M),)
    with device_context(q):
        attention_bwd_preprocess_kernel[preprocess_grid](
            out, dout, delta, dq_acc, *out.stride()[:3], *dout.stride()[:3], *acc_strides, H, S, HEAD_DIM=D,
            BLOCK_M=PREPROCESS_BLOCK_M, LONG_ROWS=long_offsets, ZERO_DQ=atomic)
        # dK/dV (and with atomics dQ): one program per key block
        launch(attention_bwd_dkdv_kernel, "bwd" if atomic else "dkdv", lambda c: (B * H * triton.cdiv(S, c["BLOCK_N"]),),
               q, dkdv_args, {**meta, "ATOMIC_DQ": atomic})
        if atomic:
            attention_bwd_dq_convert_kernel[preprocess_grid](
                dq_acc, dq, *acc_strides, *dq.stride()[:3], H, S, scale, HEAD_DIM=D, BLOCK_M=PREPROCESS_BLOCK_M,
                LONG_ROWS=long_offsets)
        else:  # dQ: one program per query tile
            dq_args = (q, k, v, dout, lse, delta, dq, prefix, None, *strides, *dq.stride()[:3], *common)
            launch(attention_bwd_dq_kernel, "dq", lambda c: (B * H * triton.cdiv(S, c["BLOCK_M"]),), q, dq_args, meta)
    return dq, dk, dv


@register("attention_bwd", "triton")
def _attention_bwd_triton(dout, q, k, v, out, lse, prefix_len, causal, scale, grads=None):
    reason = unsupported_reason(q)
    if reason is not None:
        warn_fallback_once(reason)
        return fallback("attention_bwd")(dout, q, k, v, out, lse, prefix_len, causal, scale, grads)
    return attention_backward(dout, q, k, v, out, lse, prefix_len, causal, scale, grads)


# ---- compile check -------------------------------------------------------------------------------

def _signature(kernel: str, dtype: str, has_prefix: bool, varlen: bool = False) -> dict[str, str]:
    """Argument types of a backward kernel for the compile check: "preprocess", "convert", "dkdv"
    (deterministic), "bwd" (the same kernel with dQ by atomics) or "dq"."""
    if kernel in ("preprocess", "convert"):
        if kernel == "preprocess":
            sig = {"O": dtype, "DO": dtype, "DELTA": "*fp32", "DQ_ACC": "*fp32"}
            sig.update({f"stride_{t}{d}": "i32" for t in ("o", "do", "a") for d in "bhs"})
        else:
            sig = {"DQ_ACC": "*fp32", "DQ": dtype}
            sig.update({f"stride_{t}{d}": "i32" for t in ("a", "q") for d in "bhs"})
        sig.update({"H": "i32", "S": "i32"})
        if kernel == "convert":
            sig["sm_scale"] = "fp32"
        sig.update({name: "constexpr" for name in ("HEAD_DIM", "BLOCK_M", "LONG_ROWS")})
        if kernel == "preprocess":
            sig["ZERO_DQ"] = "constexpr"
        return sig
    atomic = kernel == "bwd"
    outputs = ("DQ",) if kernel == "dq" else ("DK", "DV")
    sig = {"Q": dtype, "K": dtype, "V": dtype, "DO": dtype, "LSE": "*fp32", "DELTA": "*fp32"}
    sig.update({name: dtype for name in outputs})
    if kernel != "dq":
        sig["DQ_ACC"] = "*fp32" if atomic else "constexpr"
    sig["PREFIX"] = "*i32" if has_prefix else "constexpr"
    sig["CU_SEQLENS"] = "*i32" if varlen else "constexpr"
    strided = ("q", "k", "v", "do", *(o.lower() for o in outputs), *(("a",) if kernel != "dq" else ()))
    sig.update({f"stride_{t}{d}": "i32" for t in strided for d in "bhs"})
    sig.update({"H": "i32", "S": "i32", "T": "i32" if varlen else "constexpr", "S_BUCKET": "i32", "sm_scale": "fp32",
                "qk_scale": "fp32"})
    sig.update({name: "constexpr" for name in ("HAS_PREFIX", "CAUSAL", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "DOT_PRECISION", "LONG_ROWS",
                                               "VARLEN", "EVEN_S")})
    if kernel != "dq":
        sig["ATOMIC_DQ"] = "constexpr"
    return sig


# compile-check kernel name -> kernel function ("bwd" is the dK/dV kernel with ATOMIC_DQ)
KERNEL_FUNCTIONS = {"dkdv": attention_bwd_dkdv_kernel, "bwd": attention_bwd_dkdv_kernel, "dq": attention_bwd_dq_kernel}


def kernel_entry(kernel: str, d: int, case: str, has_prefix: bool, config, hot: bool, arch: int | None = None,
                 long_rows: bool = False, dtype: str = "bf16", varlen: bool = False, op: str = "attention_bwd") -> KernelConfig:
    """A compile-check entry of one tiled backward kernel ("dkdv", "bwd" or "dq") at one config,
    labelled f"{op}_{kernel}"."""
    entry = kernel_config(f"{op}_{kernel}", KERNEL_FUNCTIONS[kernel],
                          _signature(kernel, f"*{dtype}", has_prefix, varlen), d, case, has_prefix, config, hot,
                          long_rows, dtype=dtype, varlen=varlen, arch=arch)
    if kernel != "dq":
        entry.constexprs["ATOMIC_DQ"] = kernel == "bwd"
        if kernel == "dkdv":
            entry.constexprs["DQ_ACC"] = None
    return entry


def compile_configs() -> list[KernelConfig]:
    """Every candidate the autotuner may pick at AIMv2 sizes, each compiled for the arch whose table
    holds it (hot), the first candidate of the other supported head dims and of int64 row offsets
    (must compile; spills tolerated), and the row-wise passes (preprocess with and without the
    accumulator, convert)."""
    configs = []
    for kernel, fn in (("preprocess", attention_bwd_preprocess_kernel), ("convert", attention_bwd_dq_convert_kernel)):
        sig = _signature(kernel, "*bf16", False)
        for d, long_rows, zero_dq in ((128, False, True), (64, False, True), (128, False, False), (128, True, True)):
            if kernel == "convert" and not zero_dq:
                continue
            constexprs = {"HEAD_DIM": d, "BLOCK_M": PREPROCESS_BLOCK_M, "LONG_ROWS": long_rows}
            if kernel == "preprocess":
                constexprs["ZERO_DQ"] = zero_dq
                if not zero_dq:
                    constexprs["DQ_ACC"] = None
            signature = dict(sig, DQ_ACC="constexpr") if kernel == "preprocess" and not zero_dq else sig
            label = (f"attention_bwd_{kernel} D={d} bf16{' long rows' if long_rows else ''}"
                     f"{' no accumulator' if kernel == 'preprocess' and not zero_dq else ''}")
            configs.append(KernelConfig(label, fn, signature, constexprs, hot=not long_rows,
                                        divisible_by_16=aligned_args(signature)))

    for kernel in KERNEL_FUNCTIONS:
        for arch, capability in TABLE_CAPABILITIES.items():
            first = {d: candidate_configs(kernel, d, capability)[0] for d in KERNEL_HEAD_DIMS}
            configs += [kernel_entry(kernel, d, case, has_prefix, c, True, arch)
                        for d in (128, 64) for case, has_prefix in AIMV2_CASES for c in candidate_configs(kernel, d, capability)]
            configs += [kernel_entry(kernel, d, "prefix", True, first[d], False, arch) for d in (16, 32, 256)]
            configs.append(kernel_entry(kernel, 128, "prefix long rows", True, first[128], False, arch, long_rows=True))
        configs += [kernel_entry(kernel, d, "prefix", True, candidate_configs(kernel, d, element_size=4)[0], False,
                                 dtype="fp32") for d in FP32_HEAD_DIMS]
    return configs
