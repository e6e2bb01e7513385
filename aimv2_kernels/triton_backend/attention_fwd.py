"""Prefix-causal flash attention, forward: out = softmax(q k^T * scale, masked) v and the row lse.

One program per (query tile, batch * head). The tile's queries stay in registers while key/value
blocks stream past; the softmax is computed online in fp32 (running max m, running sum l, rescaled
accumulator), in base 2 with log2(e) folded into the scale. Key blocks are visited in two ranges (see
attention.py): fully visible blocks without any mask arithmetic or bounds checks, then the few
boundary blocks with the mask. Hidden blocks are never loaded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import fallback, register
from .kernel_config import KernelConfig
from .. import layouts
from .attention import (
    FP32_HEAD_DIMS,
    AIMV2_CASES,
    KERNEL_HEAD_DIMS,
    TABLE_CAPABILITIES,
    LN2,
    LOG2E,
    candidate_configs,
    dot_precision,
    kernel_config,
    key_ranges,
    launch,
    load_rows,
    long_rows,
    prefix_argument,
    program_coords,
    row_ptrs,
    s_bucket,
    unsupported_reason,
    visibility,
    warn_fallback_once,
)
from .common import device_context, poison


@triton.jit
def _fwd_key_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, start, end,
                  prefix, S, qk_scale,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  LONG_ROWS: tl.constexpr, EVEN_S: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [start, end). MASKED=False only for
    blocks that lie inside S and are visible to every query of the tile; with EVEN_S every block
    lies inside S, so even the masked ones load without bounds checks."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n  # (BLOCK_N,) key positions
        k = load_rows(k_base, stride_ks, cols, offs_d, S, MASKED and not EVEN_S, LONG_ROWS)  # (BLOCK_N, D)
        v = load_rows(v_base, stride_vs, cols, offs_d, S, MASKED and not EVEN_S, LONG_ROWS)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            s = tl.where(visibility(offs_m[:, None], cols[None, :], prefix), s, float("-inf"))
        # Key 0 is visible to every query and lies in the first block visited, so m_new is finite
        # from the first block on and exp2 never sees (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["S_BUCKET"])
def attention_fwd_kernel(
    Q, K, V,  # (B, H, S, D) inputs, last dim contiguous
    O,  # (B, H, S, D) output (a view of (B, S, H, D) memory)
    LSE,  # (B, H, S) fp32 output: natural-log log-sum-exp of each row's visible scores
    PREFIX,  # (B,) int32/int64 prefix lengths, or None when HAS_PREFIX is False
    CU_SEQLENS,  # VARLEN: (n + 1,) int32 sequence boundaries; else None
    stride_qb, stride_qh, stride_qs,  # VARLEN: (token, head, token) strides of the (T, H, D) views
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    H, S,  # VARLEN: S = max_seqlen, which only sizes the grid
    T,  # VARLEN: total tokens (LSE is (H, T)); else None
    S_BUCKET,  # autotuning key only
    qk_scale,  # softmax scale * log2(e)
    HAS_PREFIX: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    LONG_ROWS: tl.constexpr,  # int64 row offsets (see row_ptrs)
    VARLEN: tl.constexpr,  # packed sequences: Q, K, V, O are (T, H, D), see program_coords
    EVEN_S: tl.constexpr,  # S is a multiple of both tiles: no bounds masks (attention.even_s)
):
    # From here on S is this sample's (sequence's) length.
    off_b64, off_h64, m0, prefix, S, stats_row = program_coords(PREFIX, CU_SEQLENS, S, T, H, BLOCK_M, True,
                                                                HAS_PREFIX, CAUSAL, VARLEN)
    if VARLEN:
        if m0 >= S:  # the grid is sized for max_seqlen: this sequence has no rows here
            return
    q_base = Q + off_b64 * stride_qb + off_h64 * stride_qh
    k_base = K + off_b64 * stride_kb + off_h64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_h64 * stride_vh
    o_base = O + off_b64 * stride_ob + off_h64 * stride_oh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = load_rows(q_base, stride_qs, offs_m, offs_d, S, not EVEN_S, LONG_ROWS)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = key_ranges(m0, prefix, S, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                  0, full_end, prefix, S, qk_scale, False, BLOCK_N, DOT_PRECISION, LONG_ROWS, EVEN_S)
    acc, l_i, m_i = _fwd_key_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                                  full_end, hi, prefix, S, qk_scale, True, BLOCK_N, DOT_PRECISION, LONG_ROWS, EVEN_S)

    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_ptrs = row_ptrs(o_base, stride_os, offs_m, offs_d, LONG_ROWS)
    lse = (m_i + tl.math.log2(l_i)) * LN2  # back to natural log for the caller and the backward
    if EVEN_S:
        tl.store(o_ptrs, out)
        tl.store(LSE + stats_row + offs_m, lse)
    else:
        tl.store(o_ptrs, out, mask=offs_m[:, None] < S)
        tl.store(LSE + stats_row + offs_m, lse, mask=offs_m < S)


# ---- launcher ------------------------------------------------------------------------------------

def attention_forward(q, k, v, prefix_len, causal: bool, scale: float):
    """q, k, v (B, H, S, D) -> (out (B, H, S, D) view of (B, S, H, D) memory, lse (B, H, S) fp32)."""
    B, H, S, D = q.shape
    out = layouts.empty_bshd_output(q)  # through the module, so the poisoned-output tests can swap it
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    poison(out, lse)
    prefix = prefix_argument(prefix_len, causal)
    has_prefix = prefix is not None
    args = (
        q, k, v, out, lse, prefix, None,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        H, S, None, s_bucket(S), scale * LOG2E,
    )
    meta = dict(HAS_PREFIX=has_prefix, CAUSAL=causal, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype),
                LONG_ROWS=long_rows(S, q, k, v, out), VARLEN=False)
    with device_context(q):
        launch(attention_fwd_kernel, "fwd", lambda c: (B * H * triton.cdiv(S, c["BLOCK_M"]),), q, args, meta)
    return out, lse


@register("attention_fwd", "triton")
def _attention_fwd_triton(q, k, v, prefix_len, causal, scale):
    reason = unsupported_reason(q)
    if reason is not None:
        warn_fallback_once(reason)
        return fallback("attention_fwd")(q, k, v, prefix_len, causal, scale)
    return attention_forward(q, k, v, prefix_len, causal, scale)


# ---- compile check -------------------------------------------------------------------------------

def _signature(dtype: str, has_prefix: bool, varlen: bool = False) -> dict[str, str]:
    sig = {"Q": dtype, "K": dtype, "V": dtype, "O": dtype, "LSE": "*fp32", "PREFIX": "*i32" if has_prefix else "constexpr",
           "CU_SEQLENS": "*i32" if varlen else "constexpr"}
    for t in "qkvo":
        sig.update({f"stride_{t}b": "i32", f"stride_{t}h": "i32", f"stride_{t}s": "i32"})
    sig.update({"H": "i32", "S": "i32", "T": "i32" if varlen else "constexpr", "S_BUCKET": "i32", "qk_scale": "fp32"})
    sig.update({name: "constexpr" for name in ("HAS_PREFIX", "CAUSAL", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "DOT_PRECISION", "LONG_ROWS",
                                               "VARLEN", "EVEN_S")})
    return sig


def compile_configs() -> list[KernelConfig]:
    """Every candidate the autotuner may pick at AIMv2 sizes, each compiled for the arch whose table
    holds it (hot), and the first candidate of the other supported head dims and of int64 row offsets
    (must compile; spills tolerated)."""
    def entry(d, case, has_prefix, config, hot, arch, long_rows=False):
        return kernel_config("attention_fwd", attention_fwd_kernel, _signature("*bf16", has_prefix), d, case, has_prefix,
                             config, hot, long_rows, arch=arch)

    configs = []
    for arch, capability in TABLE_CAPABILITIES.items():
        first = {d: candidate_configs("fwd", d, capability)[0] for d in KERNEL_HEAD_DIMS}
        configs += [entry(d, case, has_prefix, c, True, arch)
                    for d in (128, 64) for case, has_prefix in AIMV2_CASES for c in candidate_configs("fwd", d, capability)]
        configs += [entry(d, "prefix", True, first[d], False, arch) for d in (16, 32, 256)]
        configs.append(entry(128, "prefix long rows", True, first[128], False, arch, long_rows=True))
    configs += [kernel_config("attention_fwd", attention_fwd_kernel, _signature("*fp32", True), d, "prefix", True,
                              candidate_configs("fwd", d, element_size=4)[0], False, dtype="fp32") for d in FP32_HEAD_DIMS]
    return configs
