"""RMSNorm and fused residual-add RMSNorm in Triton, forward and backward.

Design limits: a program holds whole rows in registers, so the hidden size goes up to MAX_HIDDEN
(16384); larger rows run the reference with a one-time warning. Small rows are packed several to a
program (see `norm_config`), large ones take one row per program. Rows are addressed
by stride (see `common.row_layout`), so views with a contiguous last dim are read in place.

The weight gradient is deterministic: the backward runs a fixed number of programs, each owning a
fixed contiguous range of rows and writing its partial column sums to its own row of a float32
buffer; a second kernel adds those rows in order. The partition depends on the GPU's SM count, so
results are bit-identical run to run on one kind of GPU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import fallback, register
from .kernel_config import KernelConfig
from .common import cdiv, device_context, multiprocessor_count, next_power_of_2, poison, row_layout, row_offsets, warn_once

MAX_HIDDEN = 16384
FWD_TILE = 2048  # values per tile (several rows when they are small): see norm_config
BWD_TILE = 4096
BWD_PROGRAMS_PER_SM = 2  # backward programs per SM: each loops over its range of rows


# ---- kernels -------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(
    X, R,  # inputs (rows addressed by stride); R is the residual, read when HAS_RESIDUAL: x's dtype or wider
    W,  # (n_cols,) weight, any float dtype, read when HAS_WEIGHT
    Y, STREAM,  # outputs, contiguous (n_rows, n_cols): normalized rows (x's dtype), x + residual (R's dtype)
    RSTD,  # output (n_rows,) float32: 1 / sqrt(mean(row^2) + eps)
    n_rows, n_cols, N1, N2,  # row count, hidden size, inner leading-dim sizes
    sx0, sx1, sx2, sr0, sr1, sr2,  # leading-dim strides of X and R
    eps,
    ROW_LEVELS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows per program, columns (>= n_cols)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x_ptrs = X + row_offsets(rows, N1, N2, sx0, sx1, sx2, ROW_LEVELS)[:, None] + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    out_offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r_ptrs = R + row_offsets(rows, N1, N2, sr0, sr1, sr2, ROW_LEVELS)[:, None] + cols[None, :]
        # The add is in float32 and the stream stored in its own dtype (the residual's, which may be
        # wider than x's); normalize that stored value so that the backward, which reads the stored
        # stream, differentiates exactly what was normalized.
        stream = (x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(STREAM.dtype.element_ty)
        tl.store(STREAM + out_offsets, stream, mask=mask)
        x = stream.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_M,)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + out_offsets, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, DRES,  # inputs (rows addressed by stride): output grad (y's dtype, may be narrower than x's),
                  # saved input (the stream after a fused add), grad of the stream (x's dtype)
    W,  # (n_cols,) weight, read when HAS_WEIGHT
    RSTD,  # (n_rows,) float32, from the forward
    DX,  # output, contiguous (n_rows, n_cols), dtype of x
    DX_NARROW,  # output, contiguous (n_rows, n_cols): dx again in the update's narrower dtype, when HAS_NARROW
    DW_PARTIAL,  # output (programs, n_cols) float32: this program's column sums of dy * x_hat
    n_rows, n_cols, rows_per_program, N1, N2,
    sdy0, sdy1, sdy2, sx0, sx1, sx2, sdr0, sdr1, sdr2,  # leading-dim strides of DY, X, DRES
    ROW_LEVELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DRES: tl.constexpr, HAS_NARROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]  # (1, BLOCK_N)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # summed over rows once, at the end
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        dy_ptrs = DY + row_offsets(rows, N1, N2, sdy0, sdy1, sdy2, ROW_LEVELS)[:, None] + cols[None, :]
        x_ptrs = X + row_offsets(rows, N1, N2, sx0, sx1, sx2, ROW_LEVELS)[:, None] + cols[None, :]
        dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]  # (BLOCK_M, 1)
        x_hat = x * rstd
        if HAS_WEIGHT:
            g = dy * w
            dw_acc += dy * x_hat
        else:
            g = dy
        # dx = rstd * (g - x_hat * mean(g * x_hat)): the projection removes the radial component.
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        if HAS_DRES:
            dr_ptrs = DRES + row_offsets(rows, N1, N2, sdr0, sdr1, sdr2, ROW_LEVELS)[:, None] + cols[None, :]
            dx += tl.load(dr_ptrs, mask=mask, other=0.0).to(tl.float32)
        out_offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        tl.store(DX + out_offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_NARROW:  # the fused residual op's update input: the same gradient, rounded once from fp32
            tl.store(DX_NARROW + out_offsets, dx.to(DX_NARROW.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _column_sum_kernel(
    P,  # (n_parts, n_cols) float32 partial sums
    OUT,  # (n_cols,) output, any float dtype
    n_parts, n_cols,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT = P.sum(0), always in the same order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < n_parts)[:, None] & (cols < n_cols)[None, :]
        acc += tl.load(P + parts.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < n_cols)


# ---- launchers -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NormConfig:
    BLOCK_M: int  # rows per tile
    BLOCK_N: int  # columns, the next power of two >= the hidden size
    num_warps: int


@functools.lru_cache(maxsize=256)  # a pure function of the shape, asked on every launch
def norm_config(n_cols: int, n_rows: int, backward: bool = False) -> NormConfig:
    """Tile shape and warps for one hidden size.

    Forward: tiles of >= FWD_TILE values, up to 32 per thread (four 16-byte bf16 loads in flight);
    occupancy comes from many small programs.
    Backward: a few persistent programs per SM, each also holding the weight and its dw accumulator,
    so tiles are larger (BWD_TILE) with 8 values per thread, which keeps two programs resident per
    SM (<= 64 registers at 512 threads) for hidden sizes up to 4096.
    """
    block_n = next_power_of_2(n_cols)
    tile, per_thread = (BWD_TILE, 8) if backward else (FWD_TILE, 32)
    block_m = min(max(1, tile // block_n), next_power_of_2(max(n_rows, 1)))
    num_warps = min(32 if backward else 16, max(4, block_m * block_n // (32 * per_thread)))
    return NormConfig(block_m, block_n, num_warps)


COLUMN_SUM_CONFIG = dict(BLOCK_P=64, BLOCK_N=32, num_warps=4)  # 128-byte column strips


def _falls_back(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Cases the kernels leave to the reference: float64, empty rows, rows wider than MAX_HIDDEN."""
    if any(t is not None and t.dtype == torch.float64 for t in (x, *others)) or x.shape[-1] == 0:
        return True
    if x.shape[-1] > MAX_HIDDEN:
        warn_once("rms_norm_hidden", f"rms_norm: hidden size {x.shape[-1]} exceeds the Triton kernel's limit of "
                  f"{MAX_HIDDEN}; running the PyTorch reference instead")
        return True
    return False


def _launch_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], eps: float):
    """Returns (y, stream or None, rstd), contiguous: y in x's dtype, the stream in the residual's
    (x's or a wider float32), rstd float32."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stream = torch.empty(x.shape, dtype=residual.dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    poison(y, stream, rstd)
    if y.numel() == 0:
        return y, stream, rstd
    (x, r), layout = row_layout(x, residual if residual is not None else x)
    w = weight.contiguous() if weight is not None else x  # x: a placeholder, never read
    cfg = norm_config(x.shape[-1], layout.n_rows)
    with device_context(x):
        _rms_norm_fwd_kernel[(cdiv(layout.n_rows, cfg.BLOCK_M),)](
            x, r, w, y, stream if stream is not None else y, rstd,
            layout.n_rows, x.shape[-1], *layout.sizes, *layout.strides[0], *layout.strides[1], eps,
            ROW_LEVELS=layout.levels, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
        )
    return y, stream, rstd


def _launch_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dresidual: Optional[Tensor],
                narrow_dtype: Optional[torch.dtype]):
    n_cols = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if weight is not None else x.new_empty(0)
    dx_narrow = torch.empty(x.shape, dtype=narrow_dtype, device=x.device) if narrow_dtype is not None else x.new_empty(0)
    if dx.numel() == 0:
        return dx, dw.zero_(), dx_narrow
    (dy, x, dres), layout = row_layout(dy, x, dresidual if dresidual is not None else dy)
    cfg = norm_config(n_cols, layout.n_rows, backward=True)
    # A fixed program count, each with a contiguous row range (a multiple of BLOCK_M rows).
    tiles = cdiv(layout.n_rows, cfg.BLOCK_M)
    programs = min(tiles, BWD_PROGRAMS_PER_SM * multiprocessor_count(x.device))
    rows_per_program = cdiv(tiles, programs) * cfg.BLOCK_M
    programs = cdiv(layout.n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols) if weight is not None else (0,), dtype=torch.float32, device=x.device)
    poison(dx, dw, partial, dx_narrow if narrow_dtype is not None else None)
    with device_context(x):
        _rms_norm_bwd_kernel[(programs,)](
            dy, x, dres, weight.contiguous() if weight is not None else x, rstd.contiguous(), dx,
            dx_narrow if narrow_dtype is not None else dx, partial,
            layout.n_rows, n_cols, rows_per_program, *layout.sizes,
            *layout.strides[0], *layout.strides[1], *layout.strides[2],
            ROW_LEVELS=layout.levels, HAS_WEIGHT=weight is not None, HAS_DRES=dresidual is not None,
            HAS_NARROW=narrow_dtype is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
        )
        if weight is not None:
            sum_cfg = COLUMN_SUM_CONFIG
            _column_sum_kernel[(cdiv(n_cols, sum_cfg["BLOCK_N"]),)](partial, dw, programs, n_cols, **sum_cfg)
    return dx, dw, dx_narrow


# ---- "triton" backend implementations (signatures of the "torch" ones in ops/norm.py) -------------

@register("rms_norm_fwd", "triton")
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    if _falls_back(x, weight):
        return fallback("rms_norm_fwd")(x, weight, eps)
    y, _, rstd = _launch_fwd(x, None, weight, eps)
    return y, rstd


@register("rms_norm_residual_fwd", "triton")
def rms_norm_residual_fwd(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if _falls_back(x, residual, weight):
        return fallback("rms_norm_residual_fwd")(x, residual, weight, eps)
    return _launch_fwd(x, residual, weight, eps)


@register("rms_norm_bwd", "triton")
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dresidual: Optional[Tensor],
                 narrow_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    if _falls_back(x, dy, weight, rstd, dresidual):
        return fallback("rms_norm_bwd")(dy, x, weight, rstd, dresidual, narrow_dtype)
    return _launch_bwd(dy, x, weight, rstd, dresidual, narrow_dtype)


# ---- ahead-of-time compile configs ---------------------------------------------------------------

AIMV2_NORM_HIDDEN = (1024, 1536, 2048, 3072)  # L, H, 1B, 3B widths (the decoder is 1024)
AIMV2_ROWS = 16384  # e.g. batch 64 x 256 patches


def _mixed_signature(signature: dict[str, str], stream_args: tuple[str, ...]) -> dict[str, str]:
    """`signature` with the stream's pointers (and the weight, an fp32 parameter) in float32: the
    bf16 autocast case of a float32 residual stream."""
    return {name: "*fp32" if name in (*stream_args, "W") else kind for name, kind in signature.items()}


def compile_configs() -> list[KernelConfig]:
    """Each kernel at the config the launchers pick for AIMv2 widths (hot) and at MAX_HIDDEN (the
    supported limit, not hot), bf16 activations and weight; the fused-residual kernels also with a
    float32 stream under bf16 updates (what a bf16 autocast training step runs)."""
    fwd_sig = {"X": "*bf16", "R": "*bf16", "W": "*bf16", "Y": "*bf16", "STREAM": "*bf16", "RSTD": "*fp32",
               **dict.fromkeys(["n_rows", "n_cols", "N1", "N2", "sx0", "sx1", "sx2", "sr0", "sr1", "sr2"], "i32"),
               "eps": "fp32", **dict.fromkeys(["ROW_LEVELS", "HAS_RESIDUAL", "HAS_WEIGHT", "BLOCK_M", "BLOCK_N"], "constexpr")}
    bwd_sig = {"DY": "*bf16", "X": "*bf16", "DRES": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DX": "*bf16",
               "DX_NARROW": "*bf16", "DW_PARTIAL": "*fp32",
               **dict.fromkeys(["n_rows", "n_cols", "rows_per_program", "N1", "N2", "sdy0", "sdy1", "sdy2",
                                "sx0", "sx1", "sx2", "sdr0", "sdr1", "sdr2"], "i32"),
               **dict.fromkeys(["ROW_LEVELS", "HAS_WEIGHT", "HAS_DRES", "HAS_NARROW", "BLOCK_M", "BLOCK_N"], "constexpr")}
    sum_sig = {"P": "*fp32", "OUT": "*bf16", "n_parts": "i32", "n_cols": "i32", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"}
    configs = []
    for n_cols in (*AIMV2_NORM_HIDDEN, MAX_HIDDEN):
        hot = n_cols in AIMV2_NORM_HIDDEN
        fwd, bwd = norm_config(n_cols, AIMV2_ROWS), norm_config(n_cols, AIMV2_ROWS, backward=True)
        for residual, mixed in ((False, False), (True, False), (True, True)):
            dtypes = "bf16+fp32 stream" if mixed else "bf16"
            configs.append(KernelConfig(
                f"rms_norm{'_residual' if residual else ''}_fwd D={n_cols} {dtypes}", _rms_norm_fwd_kernel,
                _mixed_signature(fwd_sig, ("R", "STREAM")) if mixed else fwd_sig,
                dict(ROW_LEVELS=1, HAS_RESIDUAL=residual, HAS_WEIGHT=True, BLOCK_M=fwd.BLOCK_M, BLOCK_N=fwd.BLOCK_N),
                num_warps=fwd.num_warps, hot=hot))
            configs.append(KernelConfig(
                f"rms_norm_bwd{' dres' if residual else ''} D={n_cols} {dtypes}", _rms_norm_bwd_kernel,
                _mixed_signature(bwd_sig, ("X", "DRES", "DX")) if mixed else bwd_sig,
                # a float32 stream under bf16 updates also writes the update's bf16 gradient
                dict(ROW_LEVELS=1, HAS_WEIGHT=True, HAS_DRES=residual, HAS_NARROW=mixed, BLOCK_M=bwd.BLOCK_M,
                     BLOCK_N=bwd.BLOCK_N),
                num_warps=bwd.num_warps, hot=hot))
    sum_cfg = dict(COLUMN_SUM_CONFIG)
    num_warps = sum_cfg.pop("num_warps")
    configs.append(KernelConfig("rms_norm_dw_sum bf16", _column_sum_kernel, sum_sig, sum_cfg, num_warps=num_warps))
    return configs
