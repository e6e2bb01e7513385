"""SwiGLU (silu(gate) * up) in Triton, forward and backward, separate and packed.

Elementwise, so a program takes a (BLOCK_M, BLOCK_N) tile of rows and columns and any hidden size
works (no fallback but float64). The packed op (x[..., :H] gate, x[..., H:] up, one GEMM for both)
runs the same kernels on the two halves as strided views of x, and its backward writes both halves
of dx through views too: nothing is split, copied or concatenated. Rows are addressed by stride (see
`common.row_layout`), so inputs with a contiguous last dim are read in place.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import fallback, register
from .kernel_config import KernelConfig
from .common import cdiv, device_context, next_power_of_2, poison, row_layout, row_offsets

TILE = 2048  # values per program and tensor
MAX_BLOCK_N = 1024


# ---- kernels -------------------------------------------------------------------------------------

@triton.jit
def _tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows (BLOCK_M,), columns (BLOCK_N,) and mask of program `pid`; programs walk row-major."""
    col_blocks = tl.cdiv(n_cols, BLOCK_N)
    rows = (pid // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows, cols, mask


@triton.jit
def _swiglu_fwd_kernel(
    G, U,  # gate and up (rows addressed by stride; halves of one tensor for the packed op)
    OUT,  # output (n_rows, n_cols) with row stride out_stride
    n_rows, n_cols, out_stride, N1, N2,
    sg0, sg1, sg2, su0, su1, su2,  # leading-dim strides of G and U
    ROW_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_N)
    g_ptrs = G + row_offsets(rows, N1, N2, sg0, sg1, sg2, ROW_LEVELS)[:, None] + cols[None, :]
    u_ptrs = U + row_offsets(rows, N1, N2, su0, su1, su2, ROW_LEVELS)[:, None] + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DOUT, G, U,  # output grad, gate, up (rows addressed by stride)
    DG, DU,  # outputs (n_rows, n_cols), both with row stride grad_stride (halves of dx when packed)
    n_rows, n_cols, grad_stride, N1, N2,
    sd0, sd1, sd2, sg0, sg1, sg2, su0, su1, su2,  # leading-dim strides of DOUT, G, U
    ROW_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), n_rows, n_cols, BLOCK_M, BLOCK_N)
    d_ptrs = DOUT + row_offsets(rows, N1, N2, sd0, sd1, sd2, ROW_LEVELS)[:, None] + cols[None, :]
    g_ptrs = G + row_offsets(rows, N1, N2, sg0, sg1, sg2, ROW_LEVELS)[:, None] + cols[None, :]
    u_ptrs = U + row_offsets(rows, N1, N2, su0, su1, su2, ROW_LEVELS)[:, None] + cols[None, :]
    d = tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    du = d * g * sig
    out_offsets = rows.to(tl.int64)[:, None] * grad_stride + cols[None, :]
    tl.store(DG + out_offsets, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out_offsets, du.to(DU.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SwigluConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int


@functools.lru_cache(maxsize=256)  # a pure function of the shape, asked on every launch
def swiglu_config(n_cols: int, n_rows: int) -> SwigluConfig:
    """Tile for one hidden size: columns a power of two that divides n_cols when one of at least 128
    does (AIMv2's 2816 = 11 * 256 tiles with no masked lanes), rows to fill TILE values; 4 warps
    give 16 values (two 16-byte bf16 vectors) per thread and tensor."""
    block_n = min(next_power_of_2(n_cols), MAX_BLOCK_N)
    divisor = n_cols & -n_cols  # largest power of two dividing n_cols
    if 128 <= divisor < block_n:
        block_n = divisor
    block_m = min(max(1, TILE // block_n), next_power_of_2(max(n_rows, 1)))
    return SwigluConfig(block_m, block_n, num_warps=4)


def _grid(layout, n_cols: int, cfg: SwigluConfig) -> tuple[int]:
    return (cdiv(layout.n_rows, cfg.BLOCK_M) * cdiv(n_cols, cfg.BLOCK_N),)


def _launch_fwd(gate: Tensor, up: Tensor, out: Tensor) -> Tensor:
    """out[row] = silu(gate[row]) * up[row]; out is a fresh contiguous (..., n_cols) tensor."""
    n_cols = gate.shape[-1]
    poison(out)
    if out.numel() == 0:
        return out
    (gate, up), layout = row_layout(gate, up)
    cfg = swiglu_config(n_cols, layout.n_rows)
    with device_context(gate):
        _swiglu_fwd_kernel[_grid(layout, n_cols, cfg)](
            gate, up, out, layout.n_rows, n_cols, n_cols, *layout.sizes, *layout.strides[0], *layout.strides[1],
            ROW_LEVELS=layout.levels, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
        )
    return out


def _launch_bwd(dout: Tensor, gate: Tensor, up: Tensor, dgate: Tensor, dup: Tensor, grad_stride: int) -> None:
    """Writes the gradients into dgate and dup, same-shape views with row stride grad_stride."""
    n_cols = gate.shape[-1]
    poison(dgate, dup)
    if dout.numel() == 0:
        return
    (dout, gate, up), layout = row_layout(dout, gate, up)
    cfg = swiglu_config(n_cols, layout.n_rows)
    with device_context(gate):
        _swiglu_bwd_kernel[_grid(layout, n_cols, cfg)](
            dout, gate, up, dgate, dup, layout.n_rows, n_cols, grad_stride, *layout.sizes,
            *layout.strides[0], *layout.strides[1], *layout.strides[2],
            ROW_LEVELS=layout.levels, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
        )


# ---- "triton" backend implementations (signatures of the "torch" ones in ops/swiglu.py) -----------

@register("swiglu_fwd", "triton")
def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    if gate.dtype == torch.float64:
        return fallback("swiglu_fwd")(gate, up)
    return _launch_fwd(gate, up, torch.empty(gate.shape, dtype=gate.dtype, device=gate.device))


@register("swiglu_bwd", "triton")
def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if gate.dtype == torch.float64 or dout.dtype == torch.float64:
        return fallback("swiglu_bwd")(dout, gate, up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _launch_bwd(dout, gate, up, dgate, dup, gate.shape[-1])
    return dgate, dup


@register("swiglu_packed_fwd", "triton")
def swiglu_packed_fwd(x: Tensor) -> Tensor:
    if x.dtype == torch.float64:
        return fallback("swiglu_packed_fwd")(x)
    hidden = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], hidden), dtype=x.dtype, device=x.device)
    return _launch_fwd(x[..., :hidden], x[..., hidden:], out)


@register("swiglu_packed_bwd", "triton")
def swiglu_packed_bwd(dout: Tensor, x: Tensor) -> Tensor:
    if x.dtype == torch.float64 or dout.dtype == torch.float64:
        return fallback("swiglu_packed_bwd")(dout, x)
    hidden = x.shape[-1] // 2
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_bwd(dout, x[..., :hidden], x[..., hidden:], dx[..., :hidden], dx[..., hidden:], x.shape[-1])
    return dx


# ---- ahead-of-time compile configs ---------------------------------------------------------------

AIMV2_SWIGLU_HIDDEN = (2816, 4096, 5632, 8192)  # L (and the decoder), H, 1B, 3B
AIMV2_ROWS = 16384  # e.g. batch 64 x 256 patches


def compile_configs() -> list[KernelConfig]:
    """Both kernels at the configs the launchers pick for AIMv2 hidden sizes, bf16 (the packed op runs
    the same compiled kernels with other strides)."""
    consts = ["ROW_LEVELS", "BLOCK_M", "BLOCK_N"]
    fwd_sig = {"G": "*bf16", "U": "*bf16", "OUT": "*bf16",
               **dict.fromkeys(["n_rows", "n_cols", "out_stride", "N1", "N2", "sg0", "sg1", "sg2", "su0", "su1", "su2"], "i32"),
               **dict.fromkeys(consts, "constexpr")}
    bwd_sig = {"DOUT": "*bf16", "G": "*bf16", "U": "*bf16", "DG": "*bf16", "DU": "*bf16",
               **dict.fromkeys(["n_rows", "n_cols", "grad_stride", "N1", "N2", "sd0", "sd1", "sd2",
                                "sg0", "sg1", "sg2", "su0", "su1", "su2"], "i32"),
               **dict.fromkeys(consts, "constexpr")}
    configs = []
    for n_cols in AIMV2_SWIGLU_HIDDEN:
        cfg = swiglu_config(n_cols, AIMV2_ROWS)
        constexprs = dict(ROW_LEVELS=1, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
        configs.append(KernelConfig(f"swiglu_fwd H={n_cols} bf16", _swiglu_fwd_kernel, fwd_sig, constexprs,
                                    num_warps=cfg.num_warps))
        configs.append(KernelConfig(f"swiglu_bwd H={n_cols} bf16", _swiglu_bwd_kernel, bwd_sig, constexprs,
                                    num_warps=cfg.num_warps))
    return configs
