"""Linear cross-entropy without materialized logits: the per-token part in Triton.

The token-chunk driver (`aimv2_kernels.linear_ce_chunks`) holds one (chunk, V) block of float32
logits at a time and runs the three GEMMs on cuBLAS. This kernel is everything between them, one
program per token, in one launch per chunk:

    pass 1  over vocab tiles: bias add, online max / sum-exp in fp32 -> lse; loss = lse - logit[label]
    pass 2  over vocab tiles: dlogits = (exp(logit - lse) - onehot) / n_counted, in the GEMM dtype

so the logits are read twice and the gradient written once, with no (chunk, V) temporaries. Why not
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

_MAX_BLOCK_V = 4096


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
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits
    label = tl.load(labels_ptr + row * stride_labels).to(tl.int64)
    counted = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

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

    safe_label = tl.where(counted, label, 0)  # ignored rows read a valid column and discard it
    target = tl.load(x_row + safe_label)
    if HAS_BIAS:
        target += _load_bias(bias_ptr, stride_bias, safe_label, True)
    tl.store(loss_ptr + row, tl.where(counted, lse - target, 0.0))

    if WRITE_GRAD:
        # pass 2: each tile is loaded before it is stored, so dlogits may overwrite the logits
        w = tl.where(counted, tl.load(scale_ptr), 0.0)
        d_row = dlogits_ptr + row * stride_dlogits
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
    """Vocab tile and warps for rows of V logits: up to 4096 lanes, 16 fp32 values per thread."""
    block_v = min(_MAX_BLOCK_V, max(16, next_power_of_2(V)))
    return {"BLOCK_V": block_v, "num_warps": max(1, min(8, block_v // 512))}


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
            HAS_BIAS=bias is not None, WRITE_GRAD=write_grad, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
        )


# ---- registered implementation -------------------------------------------------------------------

@register("linear_ce", "triton")
def linear_cross_entropy(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params):
    rows = ce_rows_torch if hidden.dtype == torch.float64 else ce_rows_triton
    return linear_ce_chunked(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params, rows)


# ---- compile check -------------------------------------------------------------------------------

def compile_configs() -> list[KernelConfig]:
    """The row kernel at the AIMv2 text head: V 32000, D 1024, bf16 weight (bf16 dlogits), int64
    labels, chunks of chunk_tokens() rows; with the gradient (training) and without (evaluation)."""
    V = 32000
    cfg = launch_config(V)
    rows = chunk_tokens(8192, V)
    configs = []
    for write_grad in (True, False):
        configs.append(KernelConfig(
            f"linear_ce_rows V={V} bf16 {'grad' if write_grad else 'loss only'} ({rows}-token chunks)",
            _ce_rows_kernel,
            {"logits_ptr": "*fp32", "stride_logits": "i32", "bias_ptr": "*bf16", "stride_bias": "constexpr",
             "labels_ptr": "*i64", "stride_labels": "constexpr",
             "scale_ptr": "*fp32", "loss_ptr": "*fp32", "dlogits_ptr": "*bf16" if write_grad else "*fp32",
             "stride_dlogits": "i32", "V": "i32", "ignore_index": "i32",
             "HAS_BIAS": "constexpr", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr"},
            # unit strides, which Triton specializes to constants (contiguous labels and bias)
            {"stride_bias": 1, "stride_labels": 1, "HAS_BIAS": False, "WRITE_GRAD": write_grad, "BLOCK_V": cfg["BLOCK_V"]},
            num_warps=cfg["num_warps"]))
    return configs
