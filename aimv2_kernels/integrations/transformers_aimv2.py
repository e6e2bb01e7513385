"""patch_transformers_aimv2(model): our kernels inside a transformers AIMv2 vision tower, in place.

transformers' Aimv2VisionModel (models/aimv2/modeling_aimv2.py) is built from Aimv2RMSNorm (the
T5-style norm with `variance_epsilon`), Aimv2MLP (gate_proj / up_proj / down_proj with `act_fn`) and
Aimv2Attention (q_proj, k_proj, v_proj, out_proj; forward(hidden_states, attention_mask, **kwargs)
-> (output, weights)). Each is swapped for a subclass that computes the same thing with our ops
(see `fused.py`): the weights, keys and hooks stay, and `save_pretrained` / `from_pretrained`
keep working on the state dict.

The patched attention also accepts `prefix_len` (None, an int or an int tensor (B,)) through the
model's keyword arguments, `model(pixel_values, prefix_len=m)`, for AIMv2's prefix-causal
pre-training. It runs the original code instead when given an explicit `attention_mask` (a general
dense mask) or when attention dropout is active, and, like SDPA, returns no attention weights.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import norm as norm_ops
from ..validation import SUPPORTED_HEAD_DIMS
from .fused import (
    Swap,
    attention_heads,
    gate_up_down_forward,
    is_fused,
    is_silu,
    nothing_patched,
    original_class,
    retype,
    warn_skipped,
)


def _modeling():
    try:
        from transformers.models.aimv2 import modeling_aimv2
    except ImportError as exc:
        raise ImportError(f"patch_transformers_aimv2 needs transformers with AIMv2 support (>= 4.56): {exc}") from exc
    return modeling_aimv2


def hf_rms_norm_forward(self, hidden_states):
    """Aimv2RMSNorm: weight * normalize(x) in fp32, in the promoted dtype of x and weight."""
    y = norm_ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)
    out_dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def hf_attention_forward(self, hidden_states, attention_mask=None, prefix_len=None, **kwargs):
    """Aimv2Attention through our attention op: bidirectional, or prefix-causal given prefix_len."""
    if attention_mask is not None or (self.training and self.dropout > 0):
        return original_class(self).forward(self, hidden_states, attention_mask, **kwargs)
    out = attention_heads(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                          self.num_heads, self.head_dim, prefix_len, self.is_causal, self.scale)
    return self.out_proj(out), None


def patch_transformers_aimv2(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = True,
                             strict: bool = True) -> list[Swap]:
    """Swap the RMSNorms, MLPs and attention of a transformers `Aimv2VisionModel` (or of the vision
    tower of an `Aimv2Model`; its text tower is left as it is) for ours, in place, keeping weights.

    Returns one `Swap(name, before, after)` per module changed. A model that is not a transformers
    AIMv2 model raises TypeError; when nothing is left to patch (e.g. already patched), raises
    NothingPatchedError, or with strict=False warns and returns []. Modules we cannot run (an MLP
    with another activation, an unsupported head dim) are left alone and named in a warning.
    """
    m = _modeling()
    if isinstance(model, m.Aimv2Model):
        tower, prefix = model.vision_model, "vision_model."
    elif isinstance(model, m.Aimv2VisionModel):
        tower, prefix = model, ""
    else:
        raise TypeError(f"patch_transformers_aimv2 expects a transformers Aimv2VisionModel or Aimv2Model, got "
                        f"{type(model).__name__}; for other models try aimv2_kernels.swap_modules")
    swaps, skipped = [], []
    for name, module in tower.named_modules():
        full = prefix + name
        if is_fused(module):
            continue
        if rms_norm and isinstance(module, m.Aimv2RMSNorm):
            swaps.append(retype(module, hf_rms_norm_forward, full))
        elif mlp and isinstance(module, m.Aimv2MLP):
            if is_silu(module.act_fn):
                swaps.append(retype(module, gate_up_down_forward, full))
            else:
                skipped.append(f"{full}: activation {type(module.act_fn).__name__} is not SiLU")
        elif attention and isinstance(module, m.Aimv2Attention):
            if module.head_dim in SUPPORTED_HEAD_DIMS:
                swaps.append(retype(module, hf_attention_forward, full))
            else:
                skipped.append(f"{full}: head dim {module.head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
    if not swaps:
        return nothing_patched("patch_transformers_aimv2", model, "unpatched Aimv2RMSNorm, Aimv2MLP or Aimv2Attention "
                               "in the vision tower", skipped, strict)
    warn_skipped("patch_transformers_aimv2", skipped)
    return swaps
