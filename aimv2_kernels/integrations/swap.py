"""swap_modules(model): our kernels in any model built from common module patterns, in place.

Recognized patterns (matched by structure, each module's class swapped as in `fused.py`):

- RMSNorm: `torch.nn.RMSNorm` over one dim (eps=None keeps torch's meaning: the input dtype's
  machine epsilon). A multi-dim normalized_shape is passed over.
- SwiGLU, three shapes of the same computation; the activation must be SiLU:
  (a) children `gate_proj`, `up_proj`, `down_proj` (Linear) and `act_fn`, nothing else: the
      Llama-style MLP of transformers (LlamaMLP, MistralMLP, Qwen2MLP, Aimv2MLP, ...),
      down_proj(silu(gate_proj(x)) * up_proj(x));
  (b) children `fc1_g`, `fc1_x`, `act`, `drop1`, `norm`, `fc2`, `drop2`: timm's SwiGLU;
  (c) a class whose name contains "SwiGLU" with Linear children `fc1` (gate), `fc3` (up), `fc2`
      (down) and optionally `norm`: the released AIMv2 FFN, fc2(norm(silu(fc1(x)) * fc3(x))).

Attention is not swapped generically (attention modules differ too much in masks and layouts); the
model-specific helpers (`patch_transformers_aimv2`, `patch_timm_aimv2`) do it.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..nn import SwiGLU as OurSwiGLU
from .fused import (
    KERNELS,
    PatchReport,
    Swap,
    fc13_swiglu_forward,
    gate_up_down_forward,
    is_fused,
    is_silu,
    report,
    timm_swiglu_forward,
    torch_rms_norm_forward,
)

LOOKED_FOR = ("torch.nn.RMSNorm and no SwiGLU module of a known pattern (gate_proj/up_proj/down_proj with "
              "SiLU act_fn; timm's fc1_g/fc1_x/fc2; *SwiGLU* classes with fc1/fc3/fc2)")


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _linears(children: dict[str, nn.Module], names) -> bool:
    return all(isinstance(children.get(n), nn.Linear) for n in names)


def match_rms_norm(module: nn.Module) -> tuple[Optional[Callable], str]:
    """(fused forward, "") when module is a torch.nn.RMSNorm we can run, else (None, why not or "")."""
    if not isinstance(module, nn.RMSNorm):
        return None, ""
    if len(module.normalized_shape) != 1:
        return None, f"normalized_shape {tuple(module.normalized_shape)} spans more than the last dim"
    return torch_rms_norm_forward, ""


def match_swiglu(module: nn.Module) -> tuple[Optional[Callable], str]:
    """(fused forward, "") when module is one of the documented SwiGLU patterns, else (None, why not or "")."""
    if isinstance(module, OurSwiGLU):
        return None, ""
    children = _children(module)
    if _linears(children, ("gate_proj", "up_proj", "down_proj")) and set(children) <= {"gate_proj", "up_proj", "down_proj", "act_fn"}:
        act = getattr(module, "act_fn", None)
        return (gate_up_down_forward, "") if is_silu(act) else (None, f"act_fn is {type(act).__name__}, not SiLU")
    if _linears(children, ("fc1_g", "fc1_x", "fc2")) and set(children) == {"fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2"}:
        act = children["act"]
        return (timm_swiglu_forward, "") if is_silu(act) else (None, f"act is {type(act).__name__}, not SiLU")
    if ("swiglu" in type(module).__name__.lower() and _linears(children, ("fc1", "fc2", "fc3"))
            and set(children) <= {"fc1", "fc2", "fc3", "norm"}):
        return fc13_swiglu_forward, ""
    return None, ""


def swap_modules(model: nn.Module, *, rms_norm: bool = True, swiglu: bool = True, strict: bool = True) -> PatchReport:
    """Replace, in place, every torch.nn.RMSNorm and documented SwiGLU pattern in `model` with our
    fused version (see the module docstring); returns what changed, one `Swap` per module.

    Weights, state-dict keys and hooks are kept (accelerate's hooks run the patched forward). Modules
    already patched are left alone. When nothing matches, raises NothingPatchedError (a ValueError)
    naming what was looked for, or with strict=False warns and returns []. Candidates passed over (a
    SwiGLU-shaped module with another activation, a multi-dim RMSNorm) are named in a warning and in
    the report's `passed_over`. Attention is never touched, so prefix_len does not concern it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    matchers = [m for m, on in ((match_rms_norm, rms_norm), (match_swiglu, swiglu)) if on]
    plan, passed_over = [], []
    for name, module in model.named_modules():
        if is_fused(module):
            continue
        for match in matchers:
            forward, why_not = match(module)
            if forward is not None:
                plan.append((name, module, forward, KERNELS, "Fused"))
                break
            if why_not:
                cls = type(module).__name__
                passed_over.append(Swap(name or "(model)", cls, cls, f"original: {why_not}"))
    return report("swap_modules", model, LOOKED_FOR, plan, passed_over, strict)
