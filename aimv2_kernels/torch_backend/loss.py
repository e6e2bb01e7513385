"""The "torch" backend's losses: norm-pix patch MSE and the chunked linear cross-entropy."""
from __future__ import annotations

import torch

from .. import reference as ref
from ..backend import register
from ..linear_ce_chunks import ce_rows_torch, linear_ce_chunked


def _cdt(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register("patch_mse_fwd", "torch")
def patch_mse_forward_torch(pred, target, mask, norm_pix, eps):
    return ref.patch_mse_loss(pred, target, mask, norm_pix, eps)


@register("patch_mse_bwd", "torch")
def patch_mse_backward_torch(dloss, pred, target, mask, norm_pix, eps):
    """d loss / d pred = 2 (pred - t) / P * counted / n_counted."""
    cdt = _cdt(pred)
    t = ref.normalize_patches(target, eps) if norm_pix else target.to(cdt)
    scale = 2.0 / pred.shape[-1]
    if mask is None:
        weights = torch.full(pred.shape[:-1], 1.0 / max(pred.shape[0] * pred.shape[1], 1), dtype=cdt, device=pred.device)
    else:
        counted = mask.to(cdt)
        weights = counted / counted.sum().clamp_min(1.0)
    dpred = (pred.to(cdt) - t) * (scale * weights * dloss.to(cdt)).unsqueeze(-1)
    return dpred.to(pred.dtype).contiguous()


@register("linear_ce", "torch")
def linear_ce_torch(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params):
    """(loss, dhidden, dweight, dbias) for d loss = 1, chunked over tokens (never tokens x vocab)."""
    return linear_ce_chunked(hidden, weight, labels, bias, ignore_index, grad_hidden, grad_params, ce_rows_torch)
