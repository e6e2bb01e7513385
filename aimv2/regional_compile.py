"""`--compile`: each transformer block compiled on its own (regional compilation).

Our kernels are custom ops, opaque to the compiler either way; what it can fuse is the glue around
them (casts, reshapes, the projections' epilogues), which lives inside the blocks. Compiling the
blocks rather than the whole model keeps the compiled graphs small and identical from block to
block (the parameters are graph inputs, so one graph serves every block of a stack with the same
widths), leaves the data-dependent code outside them (prefix sampling, packing, the loss's label
checks) in eager mode, and with `dynamic=True` lets the token count vary: native-resolution batches,
each packed to its own length, reuse the graphs instead of recompiling at every step.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_blocks(model: nn.Module, dynamic: bool) -> int:
    """Compile every block of model.encoder and model.decoder in place; returns how many.
    dynamic: symbolic token counts from the first call (native resolution), else torch's default
    (static first, dynamic after a size changes)."""
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    for block in blocks:
        block.compile(dynamic=True if dynamic else None)
    return len(blocks)


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (recompilations included)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
