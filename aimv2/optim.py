"""AdamW with decoupled weight decay, parameter groups, and the warm-up + cosine schedule (SPEC 2).

Weight decay applies to the matrices of linear and convolution layers only. Biases, norm weights,
position embeddings, the BOS vector and token embeddings are not decayed: shrinking them toward zero
only moves the model away from its normalization and lookup roles.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: the model's own list (`no_weight_decay()`, when it
    has one) plus every 1-D parameter and every nn.Embedding weight."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{module_name}.weight" if module_name else "weight")
    for name, param in model.named_parameters():
        if param.ndim < 2 or name.endswith(("pos_embed", "bos")):
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and the rest; frozen parameters are left out."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             **update_kind(model))


def update_kind(model: nn.Module) -> dict[str, bool]:
    """How AdamW updates the parameters. On CUDA, fused: one kernel per parameter group instead of the
    several launches of the multi-tensor path. Elsewhere, and where a parameter is not a plain tensor
    (FSDP2's sharded DTensors), foreach: one multi-tensor update instead of a Python loop over the
    parameters, which PyTorch picks by itself only on CUDA (on the CPU the loop cost the tiny preset
    about 1% of its step)."""
    params = list(model.parameters())
    if params and all(p.is_cuda and type(p) is nn.Parameter for p in params):
        return {"fused": True}
    return {"foreach": True}


class WarmupCosine:
    """lr multiplier at step s: linear from 1/warmup to 1 over `warmup` steps, then cosine down to
    `min_ratio` at `total` steps (and flat after). A class, not a closure, so it pickles."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        if total < 1 or warmup < 0 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"bad schedule: warmup={warmup}, total={total}, min_ratio={min_ratio}")
        self.warmup = min(warmup, total)
        self.total = total
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
