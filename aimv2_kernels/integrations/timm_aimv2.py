"""patch_timm_aimv2(model): our kernels inside timm's AIMv2 vision transformers, in place.

timm builds its AIMv2 models (`aimv2_large_patch14_224` and siblings) as a VisionTransformer with
RmsNorm norms (`norm1`, `norm2`, the patch embedding's `norm`, the final `norm`), SwiGLU MLPs
(`fc1_g` gate, `fc1_x` up, `fc2` down) and Attention (one `qkv` Linear, `proj`;
forward(x, attn_mask=None, is_causal=False)). Each is swapped for a subclass computing the same with
our ops (see `fused.py`); weights and state-dict keys stay. Attention with an explicit `attn_mask`,
active dropout or q/k normalization keeps timm's own code.
"""
from __future__ import annotations

from torch import nn

from ..validation import SUPPORTED_HEAD_DIMS
from .fused import (
    Swap,
    attention_heads,
    is_fused,
    is_silu,
    nothing_patched,
    original_class,
    retype,
    timm_swiglu_forward,
    torch_rms_norm_forward,
    warn_skipped,
)


def _timm():
    try:
        import timm
        from timm import layers
        from timm.models.vision_transformer import VisionTransformer
    except Exception as exc:  # noqa: BLE001 - timm fails to import in several ways (e.g. through torchvision)
        raise ImportError(f"patch_timm_aimv2 needs timm, which does not import here: {type(exc).__name__}: {exc}") from exc
    return timm, layers, VisionTransformer


def timm_attention_forward(self, x, attn_mask=None, is_causal: bool = False, **kwargs):
    """timm Attention through our attention op (bidirectional, or causal when asked)."""
    if attn_mask is not None or kwargs or (self.training and self.attn_drop.p > 0):
        return original_class(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal, **kwargs)
    B, N, _ = x.shape
    q, k, v = self.qkv(x).view(B, N, 3, -1).unbind(2)  # each (B, N, heads * head_dim)
    out = attention_heads(q, k, v, self.num_heads, self.head_dim, None, is_causal, self.scale)
    out = getattr(self, "norm", nn.Identity())(out)
    return self.proj_drop(self.proj(out))


def _attention_why_not(module) -> str:
    if not (isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)):
        return "q/k normalization"
    if module.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {module.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    return ""


def patch_timm_aimv2(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = True,
                     strict: bool = True) -> list[Swap]:
    """Swap the RmsNorms, SwiGLU MLPs and attention of a timm VisionTransformer (its AIMv2 models)
    for ours, in place, keeping weights; returns one `Swap` per module changed.

    Raises ImportError when timm does not import, TypeError for a model that is not a timm
    VisionTransformer, and NothingPatchedError (or with strict=False a warning) when nothing is left
    to patch. Modules we cannot run are left alone and named in a warning.
    """
    _, layers, VisionTransformer = _timm()
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"patch_timm_aimv2 expects a timm VisionTransformer, got {type(model).__name__}; "
                        "for other models try aimv2_kernels.swap_modules")
    norm_classes = tuple(c for c in (getattr(layers, "RmsNorm", None), getattr(layers, "RmsNormFp32", None)) if c)
    swaps, skipped = [], []
    for name, module in model.named_modules():
        if is_fused(module):
            continue
        why_not, forward = "", None
        if rms_norm and isinstance(module, norm_classes):
            forward = torch_rms_norm_forward
            if len(module.normalized_shape) != 1:
                forward, why_not = None, f"normalized_shape {module.normalized_shape} spans more than the last dim"
        elif mlp and isinstance(module, layers.SwiGLU):
            forward = timm_swiglu_forward
            if not is_silu(module.act):
                forward, why_not = None, f"activation {type(module.act).__name__} is not SiLU"
        elif attention and isinstance(module, layers.Attention):
            why_not = _attention_why_not(module)
            forward = None if why_not else timm_attention_forward
        if forward is not None:
            swaps.append(retype(module, forward, name))
        elif why_not:
            skipped.append(f"{name}: {why_not}")
    if not swaps:
        return nothing_patched("patch_timm_aimv2", model, "unpatched RmsNorm, SwiGLU or Attention", skipped, strict)
    warn_skipped("patch_timm_aimv2", skipped)
    return swaps
