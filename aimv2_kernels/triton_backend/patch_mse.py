"""Norm-pix patch MSE (the AIMv2 pixel loss) in Triton.

Each program takes BLOCK_R patches (rows of P values) of pred and target, read through their strides
so the caller's shifted views (`pixel_out[:, :-1]`, `patches[:, 1:]`) are never copied. The target
row is normalized in registers (mean, unbiased variance, eps) and never written back.

  forward:  one partial sum of counted per-patch MSE per program, then a fixed-order sum of the
            partials (no atomics: two runs give bit-identical losses)
  backward: d pred = 2 / P * (pred - t_norm) * dloss / n_counted on counted rows, 0 elsewhere; the
            only tensor written. Nothing is saved between the passes: the backward re-reads pred and
            target, which costs what reading a saved d pred would.

Limits: a whole patch lives in one tile, so P <= MAX_PATCH (16384); larger patches and float64 run the
reference with a one-time warning (float64 silently: it is the checking dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import fallback, register
from .kernel_config import KernelConfig
from .common import cdiv, device_context, next_power_of_2, poison, warn_once

MAX_PATCH = 16384
_TILE_ELEMENTS = 4096  # values of one tensor per program: 16 per thread at 8 warps


@triton.jit
def _patch_diff(
    pred_ptr, target_ptr, mask_ptr,  # pred, target (B, N, P) strided; mask uint8 (B, N) strided
    row_start, n_rows, N, P,
    s_pb, s_pn, s_pp,  # pred strides (elements)
    s_tb, s_tn, s_tp,  # target strides
    s_mb, s_mn,  # mask strides
    eps,
    HAS_MASK: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """(pred - t) in fp32, t the (normalized) target, for rows row_start + [0, BLOCK_R): shape
    (BLOCK_R, BLOCK_P), exactly 0 outside P and on rows that are out of range or not counted.
    Uncounted rows are never read."""
    rows = row_start + tl.arange(0, BLOCK_R)  # (R,)
    cols = tl.arange(0, BLOCK_P)  # (BP,)
    counted = rows < n_rows
    b = (rows // N).to(tl.int64)
    n = (rows % N).to(tl.int64)
    if HAS_MASK:
        counted = counted & (tl.load(mask_ptr + b * s_mb + n * s_mn, mask=counted, other=0) != 0)
    ok = counted[:, None] & (cols < P)[None, :]  # (R, BP)
    c64 = cols.to(tl.int64)[None, :]
    p = tl.load(pred_ptr + (b * s_pb + n * s_pn)[:, None] + c64 * s_pp, mask=ok, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + (b * s_tb + n * s_tn)[:, None] + c64 * s_tp, mask=ok, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P  # (R,)
        centered = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / (P - 1)  # unbiased, as torch.var
        t = centered / tl.sqrt(var + eps)[:, None]
    return tl.where(ok, p - t, 0.0)


@triton.jit
def _patch_mse_kernel(
    pred_ptr, target_ptr, mask_ptr,  # as in _patch_diff
    scale_ptr,  # BACKWARD: () fp32 dloss / max(n_counted, 1); unused in the forward
    out_ptr,  # forward: (programs,) fp32 sums of the counted per-patch MSE of each program's rows
              # BACKWARD: d pred, (B, N, P) contiguous in pred's dtype
    n_rows, N, P,
    s_pb, s_pn, s_pp, s_tb, s_tn, s_tp, s_mb, s_mn,
    eps,
    HAS_MASK: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    diff = _patch_diff(pred_ptr, target_ptr, mask_ptr, pid * BLOCK_R, n_rows, N, P, s_pb, s_pn, s_pp,
                       s_tb, s_tn, s_tp, s_mb, s_mn, eps, HAS_MASK, NORM_PIX, BLOCK_R, BLOCK_P)
    if BACKWARD:
        scale = tl.load(scale_ptr) * 2.0 / P
        rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_P)
        in_range = (rows < n_rows)[:, None] & (cols < P)[None, :]  # uncounted rows get their zeros here
        offsets = rows[:, None] * P + cols[None, :]
        tl.store(out_ptr + offsets, (diff * scale).to(out_ptr.dtype.element_ty), mask=in_range)
    else:
        row_mse = tl.sum(diff * diff, axis=1) / P  # (R,), 0 on uncounted rows
        tl.store(out_ptr + pid, tl.sum(row_mse, axis=0))


# ---- launcher ------------------------------------------------------------------------------------

def launch_config(P: int) -> dict[str, int]:
    """Tile and warps for patches of P values: a whole patch per row of the tile, rows stacked up to
    about _TILE_ELEMENTS values (P 588 -> 4 rows of 1024 lanes, P 3 -> 1024 rows of 4 lanes)."""
    block_p = max(next_power_of_2(P), 2)
    block_r = max(1, _TILE_ELEMENTS // block_p)
    num_warps = min(16, max(4, block_r * block_p // 512))
    return {"BLOCK_R": block_r, "BLOCK_P": block_p, "num_warps": num_warps}


def _unsupported(pred: torch.Tensor) -> bool:
    if pred.dtype == torch.float64:
        return True
    if pred.shape[-1] > MAX_PATCH:
        warn_once("patch_mse_size", f"patch_mse_loss: patches of {pred.shape[-1]} values exceed the Triton "
                  f"kernel's {MAX_PATCH}; using the PyTorch reference")
        return True
    return False


def _launch(pred, target, mask, scale, out, norm_pix, eps, backward):
    B, N, P = pred.shape
    cfg = launch_config(P)
    n_rows = B * N
    grid = (cdiv(n_rows, cfg["BLOCK_R"]),)
    mask_arg = mask.view(torch.uint8) if mask is not None else pred
    mask_strides = mask.stride() if mask is not None else (0, 0)
    with device_context(pred):
        _patch_mse_kernel[grid](
            pred, target, mask_arg, scale, out, n_rows, N, P, *pred.stride(), *target.stride(), *mask_strides, eps,
            HAS_MASK=mask is not None, NORM_PIX=norm_pix, BACKWARD=backward, BLOCK_R=cfg["BLOCK_R"],
            BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"],
        )


def _n_counted(pred: torch.Tensor, mask) -> torch.Tensor:
    """max(number of counted patches, 1) as a float32 device scalar (no host sync)."""
    if mask is None:
        return torch.full((), float(max(pred.shape[0] * pred.shape[1], 1)), device=pred.device)
    return mask.sum().clamp_min(1).to(torch.float32)


# ---- registered implementations ------------------------------------------------------------------

@register("patch_mse_fwd", "triton")
def patch_mse_forward(pred, target, mask, norm_pix, eps):
    if _unsupported(pred):
        return fallback("patch_mse_fwd")(pred, target, mask, norm_pix, eps)
    if pred.shape[0] * pred.shape[1] == 0:
        return pred.new_zeros((), dtype=torch.float32)
    programs = cdiv(pred.shape[0] * pred.shape[1], launch_config(pred.shape[-1])["BLOCK_R"])
    partials = torch.empty(programs, dtype=torch.float32, device=pred.device)
    poison(partials)
    _launch(pred, target, mask, partials, partials, norm_pix, eps, backward=False)
    return partials.sum() / _n_counted(pred, mask)


@register("patch_mse_bwd", "triton")
def patch_mse_backward(dloss, pred, target, mask, norm_pix, eps):
    if _unsupported(pred):
        return fallback("patch_mse_bwd")(dloss, pred, target, mask, norm_pix, eps)
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    poison(dpred)
    if dpred.numel() == 0:
        return dpred
    scale = dloss.to(torch.float32) / _n_counted(pred, mask)
    _launch(pred, target, mask, scale, dpred, norm_pix, eps, backward=True)
    return dpred


# ---- compile check -------------------------------------------------------------------------------

def compile_configs() -> list[KernelConfig]:
    """Forward and backward at the AIMv2 pixel head (P = 14*14*3 = 588, bf16 pred and target views with
    a unit last stride, which Triton specializes to a constant), with and without a patch mask."""
    P = 588
    cfg = launch_config(P)
    signature = {"pred_ptr": "*bf16", "target_ptr": "*bf16", "mask_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": None,
                 "n_rows": "i32", "N": "i32", "P": "i32", "s_pb": "i32", "s_pn": "i32", "s_pp": "constexpr",
                 "s_tb": "i32", "s_tn": "i32", "s_tp": "constexpr", "s_mb": "i32", "s_mn": "constexpr", "eps": "fp32",
                 "HAS_MASK": "constexpr", "NORM_PIX": "constexpr", "BACKWARD": "constexpr", "BLOCK_R": "constexpr",
                 "BLOCK_P": "constexpr"}
    configs = []
    for has_mask in (True, False):
        for backward in (False, True):
            constexprs = {"s_pp": 1, "s_tp": 1, "s_mn": 1, "HAS_MASK": has_mask, "NORM_PIX": True,
                          "BACKWARD": backward, "BLOCK_R": cfg["BLOCK_R"], "BLOCK_P": cfg["BLOCK_P"]}
            label = f"patch_mse_{'bwd' if backward else 'fwd'} P={P} bf16 {'mask' if has_mask else 'no mask'}"
            configs.append(KernelConfig(label, _patch_mse_kernel, {**signature, "out_ptr": "*bf16" if backward else "*fp32"},
                                        constexprs, num_warps=cfg["num_warps"]))
    return configs
