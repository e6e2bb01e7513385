"""How a module of another library becomes ours in place: its class is swapped for a subclass whose
forward calls our ops, and nothing else about it changes.

The module object, its parameters (so an optimizer built before the patch keeps working), buffers,
hooks, attributes and state-dict keys all stay; `isinstance` checks against the original class still
hold. The forwards below are the fused versions of the module patterns the patch helpers recognize.
Save a patched model with its state_dict: a pickled whole model would refer to the generated classes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..ops.attention import prefix_causal_attention
from ..ops.norm import rms_norm
from ..ops.swiglu import swiglu

_FUSED_CLASSES: dict[tuple[type, Callable], type] = {}


class Swap(NamedTuple):
    """One module patched in place: its qualified name in the model and its class before and after."""

    name: str
    before: str
    after: str


class NothingPatchedError(ValueError):
    """A patch helper found no module it knows how to replace."""


def is_fused(module: nn.Module) -> bool:
    return getattr(type(module), "_aimv2_kernels_fused", False)


def original_class(module: nn.Module) -> type:
    """The class a patched module had before (the direct base of its fused class)."""
    return type(module).__bases__[0] if is_fused(module) else type(module)


def retype(module: nn.Module, forward: Callable, name: str) -> Swap:
    """Swap module's class for a cached subclass using `forward`; returns the record of the change."""
    cls = type(module)
    key = (cls, forward)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": forward,
            "_aimv2_kernels_fused": True,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} computed with aimv2_kernels ops (see aimv2_kernels.integrations).",
        })
    module.__class__ = _FUSED_CLASSES[key]
    return Swap(name or "(model)", cls.__name__, module.__class__.__name__)


def nothing_patched(what: str, model: nn.Module, looked_for: str, skipped: list[str], strict: bool) -> list[Swap]:
    """Raise (strict) or warn that a patch changed nothing, saying what was looked for and why
    candidates were passed over, so a wrong call never passes silently."""
    import warnings

    kinds = sorted({type(m).__name__ for m in model.modules()})
    already = sum(is_fused(m) for m in model.modules())
    message = (f"{what} patched nothing in {type(model).__name__}: found no {looked_for}."
               + (f" {already} module(s) were already patched by an earlier call." if already else "")
               + (f" Passed over: {'; '.join(skipped)}." if skipped else "")
               + f" Module classes in the model: {', '.join(kinds[:12])}{' ...' if len(kinds) > 12 else ''}.")
    if strict:
        raise NothingPatchedError(message)
    warnings.warn(message, stacklevel=3)
    return []


def warn_skipped(what: str, skipped: list[str]) -> None:
    if skipped:
        import warnings

        warnings.warn(f"{what} left these modules as they were: {'; '.join(skipped)}", stacklevel=3)


def is_silu(act) -> bool:
    """SiLU as a module (torch's, transformers' SiLUActivation, timm's) or as the function."""
    return act is torch.nn.functional.silu or isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


# ---- fused forwards ------------------------------------------------------------------------------

def torch_rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.RMSNorm over one dim; eps=None means the machine epsilon of x's dtype, as in torch."""
    eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
    return rms_norm(x, self.weight, eps)


def gate_up_down_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down_proj(silu(gate_proj(x)) * up_proj(x)): the Llama-style MLP of transformers."""
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def timm_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's SwiGLU: drop2(fc2(norm(drop1(silu(fc1_g(x)) * fc1_x(x)))))."""
    return self.drop2(self.fc2(self.norm(self.drop1(swiglu(self.fc1_g(x), self.fc1_x(x))))))


def fc13_swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The released AIMv2 FFN: fc2(norm(silu(fc1(x)) * fc3(x))), norm optional."""
    h = swiglu(self.fc1(x), self.fc3(x))
    norm = getattr(self, "norm", None)
    return self.fc2(norm(h) if norm is not None else h)


def attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int, prefix_len,
                    causal: bool, scale: float) -> torch.Tensor:
    """q, k, v (B, S, heads * head_dim) -> attention output (B, S, heads * head_dim), no copies:
    heads are (B, H, S, D) views in, and the op's output is a view of (B, S, H, D) memory."""
    B, S = q.shape[:2]
    q, k, v = (t.view(B, S, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = prefix_causal_attention(q, k, v, prefix_len, causal=causal or prefix_len is not None, scale=scale)
    return out.transpose(1, 2).reshape(B, S, heads * head_dim)
