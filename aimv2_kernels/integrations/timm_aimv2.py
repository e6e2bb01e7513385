"""patch_timm_aimv2(model): our kernels inside timm's AIMv2 vision transformers, in place.

timm builds its AIMv2 models (`aimv2_large_patch14_224` and siblings) as a VisionTransformer with
RmsNorm norms (`norm1`, `norm2`, the patch embedding's `norm`, the final `norm`), SwiGLU MLPs
(`fc1_g` gate, `fc1_x` up, `fc2` down) and Attention (one `qkv` Linear, `proj`;
forward(x, attn_mask=None, is_causal=False)). Each is swapped for a subclass computing the same with
our ops (see `fused.py`); weights and state-dict keys stay.

timm's blocks pass no extra arguments down, so the patched model itself takes `prefix_len`
(`model(x, prefix_len=m)`, `model.forward_features(x, prefix_len=m)`) and hands it to its attention
layers through a context variable for the duration of the call. Where timm's attention code runs (an
explicit `attn_mask`, active dropout, and the layers we cannot run: q/k normalization, gating, an
unsupported head dim, attention=False) the prefix-causal mask is merged into the mask it gets.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
from torch import nn

from ..validation import SUPPORTED_HEAD_DIMS
from .fused import (
    KERNELS,
    PatchReport,
    Swap,
    attention_heads,
    is_fused,
    is_silu,
    merge_prefix_mask,
    original_class,
    report,
    timm_swiglu_forward,
    torch_rms_norm_forward,
)

# prefix_len of the patched model's call in progress, read by its attention layers
_PREFIX_LEN: ContextVar = ContextVar("aimv2_kernels_timm_prefix_len", default=None)
FALLBACK = "timm's code with the prefix mask merged in"


def _timm():
    try:
        import timm
        from timm import layers
        from timm.models.vision_transformer import VisionTransformer
    except Exception as exc:  # noqa: BLE001 - timm fails to import in several ways (e.g. through torchvision)
        raise ImportError(f"patch_timm_aimv2 needs timm, which does not import here: {type(exc).__name__}: {exc}") from exc
    return timm, layers, VisionTransformer


@contextlib.contextmanager
def _prefix_scope(model, prefix_len):
    if prefix_len is None:  # keep the caller's: forward calls forward_features without prefix_len
        yield
        return
    if model.grad_checkpointing and torch.is_grad_enabled():
        # the blocks' recomputation in backward runs outside this call, where prefix_len is unset
        raise ValueError("prefix_len cannot be combined with timm's gradient checkpointing "
                         "(set_grad_checkpointing(False), or run under torch.no_grad())")
    token = _PREFIX_LEN.set(prefix_len)
    try:
        yield
    finally:
        _PREFIX_LEN.reset(token)


def _mask_kwargs(attn_mask, is_causal) -> dict:
    # only what the caller gave, so timm versions whose forward lacks these keep working
    return {**({"attn_mask": attn_mask} if attn_mask is not None else {}), **({"is_causal": True} if is_causal else {})}


def timm_vit_forward(self, x, attn_mask=None, is_causal: bool = False, prefix_len=None):
    """VisionTransformer.forward, with prefix_len for the attention layers (None: bidirectional)."""
    with _prefix_scope(self, prefix_len):
        return original_class(self).forward(self, x, **_mask_kwargs(attn_mask, is_causal))


def timm_vit_forward_features(self, x, attn_mask=None, is_causal: bool = False, prefix_len=None):
    """VisionTransformer.forward_features, with prefix_len for the attention layers."""
    with _prefix_scope(self, prefix_len):
        return original_class(self).forward_features(self, x, **_mask_kwargs(attn_mask, is_causal))


def timm_attention_original_forward(self, x, attn_mask=None, is_causal: bool = False, **kwargs):
    """timm's Attention code, with the call's prefix_len merged into its attn_mask."""
    prefix_len = _PREFIX_LEN.get()
    if prefix_len is not None:
        # the prefix-causal visibility already is causal after the prefix: is_causal is folded in
        attn_mask, is_causal = merge_prefix_mask(attn_mask, prefix_len, x.shape[0], x.shape[1], x.device), False
    return original_class(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)


def timm_attention_forward(self, x, attn_mask=None, is_causal: bool = False, **kwargs):
    """timm Attention through our attention op: bidirectional, causal when asked, or prefix-causal
    when the patched model was called with prefix_len."""
    if attn_mask is not None or kwargs or (self.training and self.attn_drop.p > 0):
        return timm_attention_original_forward(self, x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    B, N, _ = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, -1).unbind(2)  # each (B, N, heads * head_dim)
    out = attention_heads(q, k, v, self.num_heads, self.head_dim, _PREFIX_LEN.get(), is_causal, self.scale)
    out = getattr(self, "norm", nn.Identity())(out)
    return self.proj_drop(self.proj(out))


def _attention_why_not(module) -> str:
    if not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)):
        return "q/k normalization"
    if getattr(module, "gate", None) is not None:
        return "gated attention"
    if module.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {module.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    return ""


def patch_timm_aimv2(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = True,
                     strict: bool = True) -> PatchReport:
    """Swap the RmsNorms, SwiGLU MLPs and attention of a timm VisionTransformer (its AIMv2 models)
    for ours, in place, keeping weights; the model itself then takes `prefix_len`. Returns a
    PatchReport, one `Swap(name, before, after, runs)` per module changed; `print(report)` shows
    which implementation runs in every layer.

    Raises ImportError when timm does not import, TypeError for a model that is not a timm
    VisionTransformer, and NothingPatchedError (or with strict=False a warning) when nothing is left
    to patch. Modules we cannot run are left to timm's code (attention with the prefix mask merged
    in) and named in a warning. accelerate's hooks are patched through; another wrapper replacing a
    module's forward raises before anything changed.
    """
    _, layers, VisionTransformer = _timm()
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"patch_timm_aimv2 expects a timm VisionTransformer, got {type(model).__name__}; "
                        "for other models try aimv2_kernels.swap_modules")
    norm_classes = tuple(c for c in (getattr(layers, "RmsNorm", None), getattr(layers, "RmsNormFp32", None)) if c)
    plan, passed_over = [], []
    for name, module in model.named_modules():
        if is_fused(module):
            continue
        cls = type(module).__name__
        if module is model:
            plan.append(("(model)", module, {"forward": timm_vit_forward, "forward_features": timm_vit_forward_features},
                         "timm's code, taking prefix_len for its attention layers", "PrefixLen"))
        elif rms_norm and isinstance(module, norm_classes):
            if len(module.normalized_shape) == 1:
                plan.append((name, module, torch_rms_norm_forward, KERNELS, "Fused"))
            else:
                passed_over.append(Swap(name, cls, cls, f"original: normalized_shape {module.normalized_shape} "
                                                        "spans more than the last dim"))
        elif mlp and isinstance(module, layers.SwiGLU):
            if is_silu(module.act):
                plan.append((name, module, timm_swiglu_forward, KERNELS, "Fused"))
            else:
                passed_over.append(Swap(name, cls, cls, f"original: activation {type(module.act).__name__} is not SiLU"))
        elif isinstance(module, layers.Attention):
            why_not = "attention=False" if not attention else _attention_why_not(module)
            if why_not:
                plan.append((name, module, timm_attention_original_forward, f"{FALLBACK} ({why_not})", "PrefixMasked"))
            else:
                plan.append((name, module, timm_attention_forward, f"{KERNELS}; {FALLBACK} for calls with attn_mask "
                             "or active dropout", "Fused"))
    return report("patch_timm_aimv2", model, "unpatched RmsNorm, SwiGLU or Attention", plan, passed_over, strict)
