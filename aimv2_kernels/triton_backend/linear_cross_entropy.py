"""Linear cross-entropy without materialized logits: the per-token part in Triton.

The token-chunk driver (`aimv2_kernels.linear_ce_chunks`) holds one (chunk, V) block of float32
logits at a time and runs the three GEMMs on cuBLAS. This kernel is everything between them, one
program per token, in one launch per chunk. Where the row fits on chip (V <= ONE_PASS_MAX_BLOCK,
32768: the AIMv2 vocabularies; 32 fp32 values per thread over 1024 threads), one pass:

    load the row once (+ bias), max, sum-exp in fp32 -> lse; loss = lse - logit[label];
    dlogits = (exp(logit - lse) - onehot) / n_counted from the values in registers, in the GEMM dtype

so each logit is read once and the gradient written once. Wider rows take two passes over vocab
tiles (online max / sum-exp, then the gradient), reading the logits twice. No (chunk, V)
temporaries either way. Why not
the GEMMs in Triton too: they are >95% of the FLOPs and cuBLAS runs them near peak at these shapes,
while fusing the logits GEMM with the row pass would need the logits computed twice (once for the
lse, once for the gradient), costing a third more FLOPs than this split.

Ignored tokens (label == ignore_index) get loss 0 and zero gradient rows; with every token ignored the
loss is 0, never NaN. float64 runs the PyTorch rows (it is the checking dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register
from .kernel_config import KernelConfig
from ..linear_ce_chunks import ce_rows_torch, chunk_tokens, linear_ce_chunked
from .common import device_context, next_power_of_2, poison

_MAX_BLOCK_V = 4096  # the two-pass tile
ONE_PASS_MAX_BLOCK = 32768  # the widest row held on chip whole (next power of two of V)
_ONE_PASS_VALUES_PER_THREAD = 32


@triton.jit
def _load_bias(bias_ptr, stride_bias, idx, mask):
    """bias[idx] in fp32 (0 where masked) through its stride; int64 offsets, as a strided bias may be
    a column of a wide matrix (V x stride past 2^31)."""
    return tl.load(bias_ptr + idx.to(tl.int64) * stride_bias, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_logits,  # (c, V) fp32 logits of the chunk, row stride
    bias_ptr, stride_bias,  # (V,) bias (any float dtype), any stride (a slice; 0: expanded); unused unless HAS_BIAS
    labels_ptr, stride_labels,  # (c,) int32/int64, any stride (labels[:, ::2] flattens to a strided view)
    scale_ptr,  # () fp32: 1 / max(n_counted, 1)
    loss_ptr,  # (c,) fp32 out: per-token CE, 0 where ignored
    dlogits_ptr, stride_dlogits,  # (c, V) out (GEMM dtype), may alias logits_ptr; unused unless WRITE_GRAD
    V, ignore_index,
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row * stride_labels).to(tl.int64)
    counted = label != ignore_index
    cols = tl.arange(0, BLOCK_V)
    safe_label = tl.where(counted, label, 0)  # ignored rows read a valid column and discard it
    d_row = dlogits_ptr + row * stride_dlogits

    if ONE_PASS:  # BLOCK_V >= V: the whole row in registers, each logit read once
        in_v = cols < V
        x = tl.load(x_row + cols, mask=in_v, other=float("-inf"))
        if HAS_BIAS:
            x += _load_bias(bias_ptr, stride_bias, cols, in_v)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)  # 0 past V
        s = tl.sum(e, axis=0)
        target = tl.load(x_row + safe_label)  # one scalar (cached): no second reduction over the row
        if HAS_BIAS:
            target += _load_bias(bias_ptr, stride_bias, safe_label, True)
        tl.store(loss_ptr + row, tl.where(counted, m + tl.log(s) - target, 0.0))
        if WRITE_GRAD:  # (softmax - onehot) * w, softmax = e / s; scalars folded first (fewer live values)
            w = tl.where(counted, tl.load(scale_ptr), 0.0)
            d = e * (w / s)
            d = tl.where(cols == label, d - w, d)
            tl.store(d_row + cols, d.to(dlogits_ptr.dtype.element_ty), mask=in_v)
    else:  # two passes over vocab tiles
        # pass 1: running max m and sum of exp(x - m) over vocab tiles
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            in_v = start + cols < V
            x = tl.load(x_row + start + cols, mask=in_v, other=float("-inf"))
            if HAS_BIAS:
                x += _load_bias(bias_ptr, stride_bias, start + cols, in_v)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)

        target = tl.load(x_row + safe_label)
        if HAS_BIAS:
            target += _load_bias(bias_ptr, stride_bias, safe_label, True)
        tl.store(loss_ptr + row, tl.where(counted, lse - target, 0.0))

        if WRITE_GRAD:
            # pass 2: each tile is loaded before it is stored, so dlogits may overwrite the logits
            w = tl.where(counted, tl.load(scale_ptr), 0.0)
            for start in range(0, V, BLOCK_V):
                in_v = start + cols < V
                x = tl.load(x_row + start + cols, mask=in_v, other=0.0)
                if HAS_BIAS:
                    x += _load_bias(bias_ptr, stride_bias, start + cols, in_v)
                p = tl.exp(x - lse)
                p = tl.where(start + cols == label, p - 1.0, p)
                tl.store(d_row + start + cols, (p * w).to(dlogits_ptr.dtype.element_ty), mask=in_v)


# ---- launcher ------------------------------------------------------------------------------------

def launch_config(V: int) -> dict[str, int]:
    """Block, warps and pass count for rows of V logits: the whole row (up to ONE_PASS_MAX_BLOCK
    lanes, 32 fp32 values per thread), else tiles of up to 4096 lanes with 16 values per thread."""
    whole = max(16, next_power_of_2(V))
    if whole <= ONE_PASS_MAX_BLOCK:
        warps = max(1, min(32, whole // (32 * _ONE_PASS_VALUES_PER_THREAD)))
        return {"BLOCK_V": whole, "num_warps": warps, "ONE_PASS": True}
    block_v = min(_MAX_BLOCK_V, whole)
    return {"BLOCK_V": block_v, "num_warps": max(1, min(8, block_v // 512)), "ONE_PASS": False}


def ce_rows_triton(logits, bias, labels, ignore_index, scale, loss_out, dlogits_out) -> None:
    """`rows` of the chunk driver (contract in `ce_rows_torch`), one Triton launch."""
    c, V = logits.shape
    if c == 0:
        return
    cfg = launch_config(V)
    write_grad = dlogits_out is not None
    poison(loss_out, dlogits_out if write_grad and dlogits_out.data_ptr() != logits.data_ptr() else None)
    dlogits = dlogits_out if write_grad else logits
    # bias and labels are read through their strides: the caller's views are never copied.
    bias_arg, bias_stride = (bias, bias.stride(0)) if bias is not None else (logits, 0)
    with device_context(logits):
        _ce_rows_kernel[(c,)](
            logits, logits.stride(0), bias_arg, bias_stride, labels, labels.stride(0), scale, loss_out,
            dlogits, dlogits.stride(0), V, ignore_index,
            HAS_BIAS=bias is not None, WRITE_GRAD=write_grad, BLOCK_V=cfg["BLOCK_V"], ONE_PASS=cfg["ONE_PASS"],
            num_warps=cfg["num_warps"],
        )


# ---- registered implementation -------------------------------------------------------------------

@register("linear_ce", "triton")
def linear_cross_entropy(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params):
    rows = ce_rows_torch if hidden.dtype == torch.float64 else ce_rows_triton
    return linear_ce_chunked(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params, rows)


# ---- compile check -------------------------------------------------------------------------------

def compile_configs() -> list[KernelConfig]:
    """The row kernel at the AIMv2 text head (V 32000: one pass) and at a wide vocabulary (V 128256:
    two passes), D 1024, bf16 weight (bf16 dlogits), int64 labels, chunks of chunk_tokens() rows;
    with the gradient (training) and without (evaluation)."""
    configs = []
    for V in (32000, 128256):
        cfg = launch_config(V)
        rows = chunk_tokens(8192, V)
        for write_grad in (True, False):
            configs.append(KernelConfig(
                f"linear_ce_rows V={V} bf16 {'grad' if write_grad else 'loss only'} ({rows}-token chunks)",
                _ce_rows_kernel,
                {"logits_ptr": "*fp32", "stride_logits": "i32", "bias_ptr": "*bf16", "stride_bias": "constexpr",
                 "labels_ptr": "*i64", "stride_labels": "constexpr",
                 "scale_ptr": "*fp32", "loss_ptr": "*fp32", "dlogits_ptr": "*bf16" if write_grad else "*fp32",
                 "stride_dlogits": "i32", "V": "i32", "ignore_index": "i32",
                 "HAS_BIAS": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr", "ONE_PASS": "constexpr"},
                # unit strides, which Triton specializes to constants (contiguous labels and bias)
                {"stride_bias": 1, "stride_labels": 1, "HAS_BIAS": False, "WRITE_GRAD": write_grad,
                 "BLOCK_V": cfg["BLOCK_V"], "ONE_PASS": cfg["ONE_PASS"]},
                num_warps=cfg["num_warps"]))
    return configs
