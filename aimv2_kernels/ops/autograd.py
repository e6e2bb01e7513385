"""Autograd registration that runs an op's backward on the backend its forward ran with.

`use_backend` is thread-local, and autograd runs CUDA backward passes on its own worker threads, so a
backward resolved there would see the process default instead of the caller's `with use_backend(...)`
block. The forward's backend choice is saved on ctx and re-entered around the backward. (Under
torch.compile the backward op runs later, outside any such block: choose with `set_backend` there.)
"""
from __future__ import annotations

from typing import Callable

from ..backend import get_backend, use_backend


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    def setup_with_backend(ctx, inputs, output):
        ctx.aimv2_backend = get_backend()
        setup_context(ctx, inputs, output)

    def backward_on_forward_backend(ctx, *grads):
        with use_backend(ctx.aimv2_backend):
            return backward(ctx, *grads)

    op.register_autograd(backward_on_forward_backend, setup_context=setup_with_backend)
