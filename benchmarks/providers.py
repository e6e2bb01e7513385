"""Provider builders shared by the op suites: ours per backend, eager, torch.compile, peers.

A peer library that does not import (liger-kernel, flash-attn) or a backend that cannot run here
becomes a provider with a `skip` reason, so it shows up in the table as "skipped: why" instead of
disappearing silently.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .harness import Context, Provider


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


def liger(ctx: Context, pick: Callable[[object], Callable[..., torch.Tensor]], name: str = "liger") -> Provider:
    """A Liger-Kernel function: pick(liger_kernel.transformers.functional) -> fn(*inputs)."""
    skip = needs_cuda(ctx, "Liger-Kernel")
    fn = None
    if skip is None:
        try:
            from liger_kernel.transformers import functional
            fn = pick(functional)
        except Exception as exc:  # noqa: BLE001 - any import problem means: not available here
            skip = f"skipped: liger-kernel does not import ({type(exc).__name__}: {str(exc)[:80]})"
    return Provider(name, call_with(fn) if fn else call_with(lambda *a: None), skip=skip)
