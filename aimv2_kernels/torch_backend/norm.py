"""The "torch" backend's RMSNorm: reference forward with rstd kept, analytic backward."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import register
from ..casts import as_dtype as _as


@register("rms_norm_fwd", "torch")
def _rms_norm_fwd_torch(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """Returns y (like x) and rstd = 1/sqrt(mean(x^2) + eps) of shape x.shape[:-1] in float32/64:
    reference.rms_norm's math with rstd computed once and kept."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = _as(x, cdt)
    rstd = xf.pow(2).mean(dim=-1, keepdim=True).add_(eps).rsqrt_()
    y = xf * rstd
    if weight is not None:
        y = y.mul_(_as(weight, cdt))
    return _as(y, x.dtype).contiguous(), rstd.squeeze(-1)


@register("rms_norm_bwd", "torch")
def _rms_norm_bwd_torch(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, dresidual: Optional[Tensor],
                        narrow_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w; dw = sum over rows of dy * x_hat.
    Returns (dx in x's dtype, dw or an empty tensor, dx rounded to narrow_dtype or an empty tensor):
    the fused residual op's update gets the stream's gradient in its own, narrower dtype."""
    cdt = rstd.dtype
    xf, dyf, r = _as(x, cdt), _as(dy, cdt), rstd.unsqueeze(-1)
    x_hat = xf * r
    g = dyf * _as(weight, cdt) if weight is not None else dyf
    dx = (g - x_hat * (g * x_hat).mean(dim=-1, keepdim=True)).mul_(r)
    if dresidual is not None:
        dx = dx.add_(dresidual)  # in the compute dtype: dresidual is at most as wide
    dw = _as((dyf * x_hat).reshape(-1, x.shape[-1]).sum(0), weight.dtype) if weight is not None else x.new_empty(0)
    dx_narrow = _as(dx, narrow_dtype).contiguous() if narrow_dtype is not None else x.new_empty(0)
    return _as(dx, x.dtype).contiguous(), dw, dx_narrow


@register("rms_norm_residual_fwd", "torch")
def _rms_norm_residual_fwd_torch(x, residual, weight, eps):
    """x (the update) plus residual (the stream, x's dtype or a wider float32) in the residual's dtype,
    then normalized; returns (y in x's dtype, stream, rstd), all contiguous."""
    stream = _as(residual + x, residual.dtype).contiguous()  # a bf16 + fp32 add runs in fp32
    y, rstd = _rms_norm_fwd_torch(stream, weight, eps)
    return _as(y, x.dtype), stream, rstd
