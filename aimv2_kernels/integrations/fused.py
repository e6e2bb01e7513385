"""How a module of another library becomes ours in place: its class is swapped for a subclass whose
forward calls our ops, and nothing else about it changes.

The module object, its parameters (so an optimizer built before the patch keeps working), buffers,
hooks, attributes and state-dict keys all stay; `isinstance` checks against the original class still
hold. The forwards below are the fused versions of the module patterns the patch helpers recognize.
Save a patched model with its state_dict: a pickled whole model would refer to the generated classes.
"""
from __future__ import annotations

import types
from typing import Callable, NamedTuple, Union

import torch
from torch import nn

from ..ops.attention import prefix_causal_attention
from ..ops.norm import rms_norm
from ..ops.swiglu import swiglu
from ..validation import prefix_tensor

_FUSED_CLASSES: dict[tuple, type] = {}

KERNELS = "aimv2_kernels"  # the `runs` of a module whose forward is ours on every call


class Swap(NamedTuple):
    """One module a patch helper looked at: its qualified name, its class before and after, and which
    implementation runs when it is called (ours, or the original and why)."""

    name: str
    before: str
    after: str
    runs: str = KERNELS


class PatchReport(list):
    """What a patch helper did: a list of `Swap`, one per module whose class it changed, plus
    `passed_over`, the candidates it left exactly as they were (their `runs` says why). `str(report)`
    is a table of both, one line per module, so skipped layers show without reading warnings."""

    def __init__(self, swaps=(), passed_over=()):
        super().__init__(swaps)
        self.passed_over = list(passed_over)

    def __str__(self) -> str:
        rows = sorted([*self, *self.passed_over], key=lambda s: s.name)
        if not rows:
            return "(nothing patched)"
        width = max(len(s.name) for s in rows)
        return "\n".join(f"{s.name:<{width}}  {s.before} -> {s.after}: {s.runs}" for s in rows)


class NothingPatchedError(ValueError):
    """A patch helper found no module it knows how to replace."""


def is_fused(module: nn.Module) -> bool:
    return getattr(type(module), "_aimv2_kernels_fused", False)


def original_class(module: nn.Module) -> type:
    """The class a patched module had before (the direct base of its fused class)."""
    return type(module).__bases__[0] if is_fused(module) else type(module)


Methods = Union[Callable, dict]


def _fused_class(cls: type, methods: dict, prefix: str) -> type:
    key = (cls, prefix, tuple(sorted(methods.items())))
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"{prefix}{cls.__name__}", (cls,), {
            **methods,
            "_aimv2_kernels_fused": True,
            "__module__": __name__,
            "__doc__": f"{cls.__name__} patched by aimv2_kernels.integrations ({', '.join(methods)} replaced).",
        })
    return _FUSED_CLASSES[key]


def _hook_fix(module: nn.Module, name: str) -> Callable[[], None]:
    """What to do, after the class swap, about a `forward` set on the instance, which would shadow the
    new class's forward so that the patch never runs (the kernels silently skipped, prefix_len ignored).

    accelerate's hooks (device_map=..., dispatch_model, cpu_offload) set `module.forward` to a wrapper
    that calls `module._old_forward`, the original bound forward: that one is re-bound to the new
    class, so the hook keeps moving weights and our forward runs inside it. A leftover bound original
    forward (a removed hook) is dropped. Any other instance forward cannot be patched through: error."""
    cls = type(module)
    own = module.__dict__.get("forward")
    if own is None:
        return lambda: None

    def is_bound_original(f) -> bool:
        return getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is cls.forward

    old = module.__dict__.get("_old_forward")
    if hasattr(module, "_hf_hook") and is_bound_original(old):
        return lambda: setattr(module, "_old_forward", types.MethodType(type(module).forward, module))
    if is_bound_original(own):
        return lambda: module.__dict__.pop("forward")
    raise ValueError(
        f"{name or '(model)'} ({cls.__name__}) has its forward replaced on the instance ({own!r}), by a hook or "
        "wrapper the patch cannot work through: the patched forward would never run. Patch the model before "
        "wrapping or dispatching it (accelerate's hooks are handled), or remove that wrapper first.")


def apply_plan(plan: list[tuple[str, nn.Module, Methods, str, str]]) -> list[Swap]:
    """Swap classes for a list of (name, module, forward or {method: function}, runs, class prefix).

    Every module is checked for instance-level forwards first, so a model that cannot be patched
    raises before any of its modules changed."""
    fixes = [_hook_fix(module, name) for name, module, *_ in plan]
    swaps = []
    for (name, module, methods, runs, prefix), fix in zip(plan, fixes):
        cls = type(module)
        module.__class__ = _fused_class(cls, methods if isinstance(methods, dict) else {"forward": methods}, prefix)
        fix()
        swaps.append(Swap(name or "(model)", cls.__name__, module.__class__.__name__, runs))
    return swaps


def merge_prefix_mask(mask, prefix_len, batch: int, seq: int, device, additive_dtype=None):
    """The mask to hand an attention implementation that is not ours so that it honours prefix_len:
    `mask` with every key outside the prefix-causal visibility (key j visible to query i iff j <= i or
    j < prefix_len[b]) removed. A boolean mask (True = visible) stays boolean; a float (additive) mask
    gets the dtype's lowest value there. With `additive_dtype`, for implementations that add the mask
    to the scores (transformers' eager), the result is additive: no mask becomes zeros, and a boolean
    mask is added as 0 / 1, exactly as that implementation would add it. Without: no mask becomes a
    boolean (B, 1, S, S) mask."""
    from ..reference import prefix_visibility

    prefix = prefix_tensor(prefix_len, batch, device, "B", "one prefix length per sample")
    visible = prefix_visibility(seq, prefix, device=device).unsqueeze(1)  # (B, 1, S, S)
    if additive_dtype is not None:
        mask = torch.zeros((), dtype=additive_dtype, device=device) if mask is None else mask.to(additive_dtype)
    elif mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return torch.where(visible, mask, torch.finfo(mask.dtype).min)


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


def report(what: str, model: nn.Module, looked_for: str, plan: list, passed_over: list[Swap],
           strict: bool) -> PatchReport:
    """Carry out a helper's plan and say what it did: NothingPatchedError (or a warning) when nothing
    runs our ops, a warning naming the candidates left to the original code, and the PatchReport."""
    left = [f"{s.name} ({s.before}): {s.runs}" for s in passed_over]
    if not any(runs == KERNELS or runs.startswith(KERNELS) for *_, runs, _ in plan):
        left += [f"{name} ({type(module).__name__}): {runs}" for name, module, _, runs, _ in plan]
        return PatchReport(nothing_patched(what, model, looked_for, left, strict))
    swaps = apply_plan(plan)
    # attention layers we only taught prefix_len still run the original code: name them too
    warn_skipped(what, left + [f"{s.name} ({s.before}): {s.runs}" for s in swaps if s.after.startswith("PrefixMasked")])
    return PatchReport(swaps, passed_over)


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
