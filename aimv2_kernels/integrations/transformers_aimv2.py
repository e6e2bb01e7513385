"""patch_transformers_aimv2(model): our kernels inside a transformers AIMv2 vision tower, in place.

transformers' Aimv2VisionModel (models/aimv2/modeling_aimv2.py) is built from Aimv2RMSNorm (the
T5-style norm with `variance_epsilon`), Aimv2MLP (gate_proj / up_proj / down_proj with `act_fn`) and
Aimv2Attention (q_proj, k_proj, v_proj, out_proj; forward(hidden_states, attention_mask, **kwargs)
-> (output, weights)). Each is swapped for a subclass that computes the same thing with our ops
(see `fused.py`): the weights, keys and hooks stay, and `save_pretrained` / `from_pretrained`
keep working on the state dict.

The patched attention also accepts `prefix_len` (None, an int or an int tensor (B,)) through the
model's keyword arguments, `model(pixel_values, prefix_len=m)`, for AIMv2's prefix-causal
pre-training. Our kernel runs unless the call needs transformers' own attention: an explicit
`attention_mask`, active attention dropout, or `output_attentions=True` (attention maps are what the
caller asked for). Then the original code runs with the prefix-causal mask merged into its mask, so
prefix_len is never dropped; attention layers we cannot run (an unsupported head dim, or
attention=False) get that same mask merging and nothing else.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import norm as norm_ops
from ..validation import SUPPORTED_HEAD_DIMS
from .fused import (
    KERNELS,
    PatchReport,
    Swap,
    attention_heads,
    gate_up_down_forward,
    is_fused,
    is_silu,
    merge_prefix_mask,
    original_class,
    report,
)

# the attention implementations whose masks merge_prefix_mask can write: sdpa takes a boolean
# mask, eager adds the mask to the scores (so it gets an additive one)
MASKABLE = ("sdpa", "eager")
FALLBACK = "transformers' code with the prefix mask merged in"


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


def hf_attention_original_forward(self, hidden_states, attention_mask=None, prefix_len=None, **kwargs):
    """Aimv2Attention's own code, with prefix_len merged into the mask it gets (it ignores the keyword)."""
    if prefix_len is not None:
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        if impl not in MASKABLE:
            raise ValueError(f"prefix_len cannot be honoured by attn_implementation={impl!r} in a layer where "
                             f"transformers' attention runs; build the model with attn_implementation in {MASKABLE}")
        B, S = hidden_states.shape[:2]
        attention_mask = merge_prefix_mask(attention_mask, prefix_len, B, S, hidden_states.device,
                                           hidden_states.dtype if impl == "eager" else None)
    return original_class(self).forward(self, hidden_states, attention_mask, **kwargs)


def _wants_attention_maps(module, kwargs) -> bool:
    # transformers passes output_attentions down through the layers' kwargs, or reads it from the config
    asked = kwargs.get("output_attentions")
    return bool(asked if asked is not None else getattr(module.config, "output_attentions", False))


def hf_attention_forward(self, hidden_states, attention_mask=None, prefix_len=None, **kwargs):
    """Aimv2Attention through our attention op: bidirectional, or prefix-causal given prefix_len."""
    if attention_mask is not None or (self.training and self.dropout > 0) or _wants_attention_maps(self, kwargs):
        return hf_attention_original_forward(self, hidden_states, attention_mask, prefix_len, **kwargs)
    out = attention_heads(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                          self.num_heads, self.head_dim, prefix_len, self.is_causal, self.scale)
    return self.out_proj(out), None


def patch_transformers_aimv2(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = True,
                             strict: bool = True) -> PatchReport:
    """Swap the RMSNorms, MLPs and attention of a transformers `Aimv2VisionModel` (or of the vision
    tower of an `Aimv2Model`; its text tower is left as it is) for ours, in place, keeping weights.

    Returns a PatchReport: one `Swap(name, before, after, runs)` per module changed, `runs` saying
    which implementation runs there; `print(report)` shows every layer. Attention layers our kernel
    cannot run (head dim, or attention=False) still change class, to one that only merges prefix_len
    into transformers' mask. A model that is not a transformers AIMv2 model raises TypeError; when
    nothing is left to patch (e.g. already patched), raises NothingPatchedError, or with strict=False
    warns and returns []. Modules left to the original code are also named in a warning. Modules
    carrying accelerate hooks (device_map=..., offloading) are patched through the hook; another
    wrapper replacing a module's forward raises before anything changed.
    """
    m = _modeling()
    if isinstance(model, m.Aimv2Model):
        tower, prefix = model.vision_model, "vision_model."
    elif isinstance(model, m.Aimv2VisionModel):
        tower, prefix = model, ""
    else:
        raise TypeError(f"patch_transformers_aimv2 expects a transformers Aimv2VisionModel or Aimv2Model, got "
                        f"{type(model).__name__}; for other models try aimv2_kernels.swap_modules")
    impl = getattr(tower.config, "_attn_implementation", None) or "eager"
    plan, passed_over = [], []
    for name, module in tower.named_modules():
        full = prefix + name
        if is_fused(module):
            continue
        if rms_norm and isinstance(module, m.Aimv2RMSNorm):
            plan.append((full, module, hf_rms_norm_forward, KERNELS, "Fused"))
        elif mlp and isinstance(module, m.Aimv2MLP):
            if is_silu(module.act_fn):
                plan.append((full, module, gate_up_down_forward, KERNELS, "Fused"))
            else:
                cls = type(module).__name__
                passed_over.append(Swap(full, cls, cls, f"original: activation {type(module.act_fn).__name__} is not SiLU"))
        elif isinstance(module, m.Aimv2Attention):
            if attention and module.head_dim in SUPPORTED_HEAD_DIMS:
                plan.append((full, module, hf_attention_forward, f"{KERNELS}; {FALLBACK} (attn_implementation="
                             f"{impl!r}) for calls with attention_mask, output_attentions or active dropout", "Fused"))
            else:
                why = ("attention=False" if not attention
                       else f"head dim {module.head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
                plan.append((full, module, hf_attention_original_forward, f"{FALLBACK} ({why})", "PrefixMasked"))
    return report("patch_transformers_aimv2", model, "unpatched Aimv2RMSNorm, Aimv2MLP or Aimv2Attention in the "
                  "vision tower", plan, passed_over, strict)
