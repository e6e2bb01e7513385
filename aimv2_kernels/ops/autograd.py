"""Two ways into one implementation: the custom op, and the eager fast path.

Every public op is a `torch.library` custom op with registered autograd: the path under
torch.compile, export and opcheck, and wherever tensors are fake, functional or another subclass, or a
dispatch mode is active (a `TorchDispatchMode` must see our op as one call). In plain eager mode the
library's machinery (argument normalization, redispatch, aliasing checks, the dynamo-disable wrapper)
costs more than a small call's whole work, so there the same forward body, `setup_context` and
backward run inside a plain `torch.autograd.Function` instead. Nothing of the math exists twice:
`register_autograd` builds both from the same three functions and returns the caller.

Both paths switch off materialized gradients: an output whose gradient is absent (rstd, the residual
stream when only y is used, the loss's side outputs) reaches the backward as None instead of a zero
tensor, so every backward here handles None.

The backward runs on the backend its forward ran with: `use_backend` is thread-local, and autograd
runs CUDA backward passes on its own worker threads, where the caller's `with use_backend(...)` block
is not in force. The forward's choice is saved on ctx and re-entered around the backward. (Under
torch.compile the backward op runs later, outside any such block: choose with `set_backend` there.)
"""
from __future__ import annotations

from typing import Callable

import torch

from ..backend import get_backend, use_backend

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*args) -> bool:
    """True when a call may take the fast path: not tracing for torch.compile or export, no dispatch
    mode, and every tensor argument a plain tensor (fake and functional tensors, which make_fx and
    opcheck trace with, are subclasses and take the custom op)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def call(op, body: Callable, *args):
    """op(*args), or its body directly on the fast path (used by backwards for their backward ops)."""
    return body(*args) if eager(*args) else op(*args)


def _on_forward_backend(backward: Callable) -> Callable:
    def run(ctx, *grads):
        if ctx.aimv2_backend == get_backend():  # the common case: same thread, same choice
            return backward(ctx, *grads)
        with use_backend(ctx.aimv2_backend):
            return backward(ctx, *grads)
    return run


def register_autograd(op, forward: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """Register autograd on custom op `op` and return the caller the functional API uses: `op` itself
    where `eager` says no, else `forward` (the op's body) directly when no gradient is wanted, else
    through a plain autograd.Function with the same setup_context and backward."""

    def setup(ctx, inputs, output):
        ctx.aimv2_backend = get_backend()
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    run_backward = _on_forward_backend(backward)
    op.register_autograd(run_backward, setup_context=setup)

    # Old-style (ctx in forward): the cheapest form of autograd.Function to call.
    def fast_forward(ctx, *args):
        output = forward(*args)
        setup(ctx, args, output)
        return output

    function = type(f"{op._name.split('::')[-1]}_eager", (torch.autograd.Function,),
                    {"forward": staticmethod(fast_forward), "backward": staticmethod(run_backward)})
    apply = function.apply

    def caller(*args):
        # eager() and "does any input want a gradient" in one pass: this runs on every call.
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return op(*args)
        grad = False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) not in _PLAIN:
                    return op(*args)
                grad = grad or a.requires_grad
        if grad and torch.is_grad_enabled():
            return apply(*args)
        return forward(*args)

    caller.function = function  # for tests: the fast path's autograd.Function
    return caller
