"""Multi-process training under torchrun: process group, DDP or FSDP2 wrapping, full state dicts.

    torchrun --nproc_per_node=8 -m aimv2.train --preset large [--fsdp]

Without torchrun's environment (WORLD_SIZE unset or 1) every helper is a no-op on one process.
Collectives use NCCL on CUDA and gloo on CPU. Checkpoints always hold *full* (unsharded) state with
parameter names as keys, whatever the wrapping, so a run saved under FSDP resumes under DDP or on a
single process and the probe reads the same file.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .cli import UsageError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was requested but no CUDA device is available")
    return device


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return DistInfo(rank, world, local_rank, device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes, in place (and returned)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag: bool, info: DistInfo) -> bool:
    """True on every process when `flag` is true on any one (e.g. a signal that reached one rank)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_model(model: nn.Module, info: DistInfo, fsdp: bool = False) -> nn.Module:
    """DDP, or FSDP2 with every block of every nn.ModuleList sharded on its own, then the root.

    FSDP2 shards parameters in place: build the optimizer from the returned module, after this call.
    """
    if not info.enabled:
        if fsdp:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile and DDP wrappers (FSDP2 wraps nothing)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one accumulation micro-step: gradients are all-reduced only when `sync`."""
    inner = getattr(model, "_orig_mod", model)
    if sync:
        return contextlib.nullcontext()
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # an FSDP2 module
        inner.set_requires_gradient_sync(False)
        return _restore_fsdp_sync(inner)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_fsdp_sync(module: nn.Module):
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) unsharded on the CPU, keyed by parameter name. Every process
    must call this (it gathers shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return get_state_dict(unwrap(model), optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of `full_state`; every process loads the same full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(unwrap(model), optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=True))
