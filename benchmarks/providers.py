"""Provider builders shared by the op suites: ours per backend, eager, torch.compile, peers.

A peer library that does not import (liger-kernel, cut-cross-entropy, flash-attn) or a backend that
cannot run here becomes a provider with a `skip` reason, so it shows up in the table as "skipped: why"
instead of disappearing silently.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .harness import FWD, Context, Provider

DETERMINISTIC_ENV = "AIMV2_KERNELS_DETERMINISTIC"  # "1": our ops run their deterministic algorithms
DETERMINISTIC_SUFFIX = " deterministic"


def call_with(fn: Callable[..., torch.Tensor]) -> Callable[[tuple], Callable[[], torch.Tensor]]:
    """bind() for a provider that simply calls fn(*inputs)."""
    return lambda inputs: (lambda: fn(*inputs))


def _our_coverage(backend: str, families: Sequence[str], device: torch.device) -> tuple[Optional[str], str]:
    """(skip reason, note) for our op on `backend`. A family "rms_norm" covers the kernels
    "rms_norm", "rms_norm_fwd" and "rms_norm_bwd", whichever are registered. An op none of whose
    kernels this backend implements is skipped (timing another backend under its name would
    mislead); one that falls back for some kernels runs, with the fallbacks in the note."""
    import aimv2_kernels as ak
    from aimv2_kernels.backend import resolve

    reason = ak.unavailable_reason(backend)
    if reason is not None:
        return f"skipped: {backend} backend unavailable ({reason})", ""
    own, fallbacks = 0, []
    with ak.use_backend(backend):
        for family in families:
            for kernel in (family, f"{family}_fwd", f"{family}_bwd"):
                try:
                    got = resolve(kernel, device)[0]
                except KeyError:  # no kernel of that name
                    continue
                if got == backend:
                    own += 1
                else:
                    fallbacks.append(f"{kernel} runs {got}")
    if not own:
        return f"skipped: no {backend} kernel for this op yet ({', '.join(fallbacks) or 'no kernel registered'})", ""
    return None, "; ".join(fallbacks)


def ours(ctx: Context, fn: Callable[..., torch.Tensor], kernels: Sequence[str]) -> list[Provider]:
    """Our public op on each backend. On a GPU: "ours-triton", "ours-cuda". On the CPU smoke run:
    the reference backend ("reference", the custom-op layer on PyTorch) and the Triton kernels in the
    interpreter ("ours-triton", when TRITON_INTERPRET=1). kernels: the kernel families the op runs."""
    providers = []
    if ctx.smoke:
        providers.append(Provider("reference", call_with(fn), comparable=False, backend="torch"))
    for backend in ("triton",) if ctx.smoke else ("triton", "cuda"):
        skip, note = _our_coverage(backend, kernels, ctx.device)
        providers.append(Provider(f"ours-{backend}", call_with(fn), ours=True, backend=backend, skip=skip, note=note))
    return providers


def deterministic(provider: Provider) -> Provider:
    """One of ours again, named "<name> deterministic", with AIMV2_KERNELS_DETERMINISTIC=1 while it
    runs (its backward included: the switch is read when the backward runs). The switch picks a
    backward algorithm only, so the forward-only mode is skipped: it would time the same forward."""
    return dataclasses.replace(provider, name=provider.name + DETERMINISTIC_SUFFIX,
                               env={**provider.env, DETERMINISTIC_ENV: "1"},
                               skip_modes={**provider.skip_modes, FWD: f"skipped: same forward as {provider.name}"})


def eager(fn: Callable[..., torch.Tensor], name: str = "eager", **kw) -> Provider:
    return Provider(name, call_with(fn), **kw)


def compiled(ctx: Context, fn: Callable[..., torch.Tensor], name: str = "torch.compile") -> Provider:
    """fn under torch.compile (static shapes: one graph per size, built in the untimed first call)."""
    if ctx.smoke:
        return Provider(name, call_with(fn), skip="skipped: torch.compile is not built in the CPU smoke run")
    graph = torch.compile(fn, dynamic=False)
    return Provider(name, call_with(graph))


def needs_cuda(ctx: Context, name: str) -> Optional[str]:
    return f"skipped: {name} needs a CUDA GPU" if ctx.smoke else None


def peer(ctx: Context, name: str, library: str, load: Callable[[], Callable[..., torch.Tensor]], *,
         gpu_name: Optional[str] = None, **kw) -> Provider:
    """A peer library's function as a provider. load() imports the library and returns fn(*inputs);
    it runs only on a GPU (every peer is a CUDA or Triton GPU kernel), and any exception it raises
    becomes the skip reason "<library> does not import (...)", so a missing or broken wheel shows up
    in the table instead of ending the run. gpu_name: how the CPU smoke run's skip names the peer."""
    skip, fn = needs_cuda(ctx, gpu_name or library), None
    if skip is None:
        try:
            fn = load()
        except Exception as exc:  # noqa: BLE001 - any import problem means: not available here
            skip = f"skipped: {library} does not import ({type(exc).__name__}: {str(exc)[:80]})"
    return Provider(name, call_with(fn) if fn else call_with(lambda *a: None), skip=skip, **kw)


def liger(ctx: Context, pick: Callable[[object], Callable[..., torch.Tensor]], name: str = "liger") -> Provider:
    """A Liger-Kernel function: pick(liger_kernel.transformers.functional) -> fn(*inputs)."""
    def load():
        from liger_kernel.transformers import functional
        return pick(functional)
    return peer(ctx, name, "liger-kernel", load, gpu_name="Liger-Kernel")


def cut_cross_entropy(ctx: Context, pick: Callable[[Callable], Callable[..., torch.Tensor]], name: str) -> Provider:
    """Apple's Cut Cross-Entropy: pick(cut_cross_entropy.linear_cross_entropy) -> fn(*inputs)."""
    def load():
        from cut_cross_entropy import linear_cross_entropy
        return pick(linear_cross_entropy)
    return peer(ctx, name, "cut-cross-entropy", load)
