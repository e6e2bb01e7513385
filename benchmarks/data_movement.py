"""Pure data movement of one AIMv2 training step, counted on any machine (no timing).

    python -m benchmarks.data_movement [--preset large] [--batch 2] [--backend torch]

Runs one forward and backward of `aimv2.AIMv2Model` (bf16 autocast on the CPU, random images and
captions) under a dispatch mode that sees every operator the step runs, and counts the bytes each one
writes. Our own ops (aimv2_kernels::*) count as one operator each, whatever their body runs, as they
are one kernel (or one fused sequence) on a GPU. Views write nothing and are not counted.

"Data movement" is an operator that only moves or fills bytes: copies and casts (copy_, _to_copy,
clone), concatenations and stacks, zero and constant fills. The report gives it per sample and as a
share of all bytes written, its largest sources, and the operators per encoder block (forward and
backward), a CPU stand-in for kernel launches. The same file runs against another checkout's
packages (PYTHONPATH=that checkout python path/to/data_movement.py) to compare commits.
"""
from __future__ import annotations

import argparse
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
MOVEMENT = {
    aten.copy_.default, aten._to_copy.default, aten.clone.default, aten.cat.default, aten.stack.default,
    aten.zero_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zeros.default, aten.zeros_like.default,
    aten.new_zeros.default, aten.full.default, aten.new_full.default, aten.full_like.default,
    aten.constant_pad_nd.default, aten.split_with_sizes_copy.default, aten.unbind_copy.int,
}
MOVEMENT_NAMES = {str(op.overloadpacket.__name__) for op in MOVEMENT}  # the counters' keys


class ByteCounter(TorchDispatchMode):
    """Bytes written per operator name, and how many operators ran (views excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()
        self.calls = collections.Counter()
        self._inside_ours = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside_ours:  # a step of one of our ops: counted as that op
            return func(*args, **kwargs)
        ours = func.namespace == "aimv2_kernels"
        self._inside_ours += ours
        try:
            out = func(*args, **kwargs)
        finally:
            self._inside_ours -= ours
        if not func.is_view:
            name = str(func.overloadpacket.__name__) if not ours else str(func)
            self.calls[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out

    def movement(self) -> int:
        return sum(b for name, b in self.bytes.items() if name in MOVEMENT_NAMES)


def _inputs(config, batch: int):
    images = torch.randn(batch, config.channels, config.image_size, config.image_size)
    tokens = torch.randint(1, config.vocab_size, (batch, config.max_text_len))
    return images, tokens


def count_step(preset: str, batch: int) -> ByteCounter:
    from aimv2 import AIMv2Config, AIMv2Model

    torch.manual_seed(0)
    config = AIMv2Config.preset(preset)
    model = AIMv2Model(config).train()
    images, tokens = _inputs(config, batch)
    counter = ByteCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        model(images, tokens).total.backward()
    return counter


def count_block(preset: str, batch: int) -> ByteCounter:
    """One encoder block's forward and backward at the preset's widths (the stream float32, as under
    autocast after the position embeddings)."""
    from aimv2 import AIMv2Config, AIMv2Model

    config = AIMv2Config.preset(preset)
    block = AIMv2Model(config).encoder.blocks[0]
    stream = torch.randn(batch, config.num_patches, config.enc_dim, requires_grad=True)
    update = torch.randn(batch, config.num_patches, config.enc_dim, requires_grad=True)
    prefix = torch.full((batch,), config.num_patches // 2)
    counter = ByteCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        new_stream, new_update = block(stream, update, prefix, True)
        (new_stream.float().sum() + new_update.float().sum()).backward()
    return counter


def report(preset: str, batch: int) -> str:
    """Per sample: what grows with the batch, the step at 2 x batch minus the step at batch, over
    batch (the weights' casts and gradients, the same at any batch, drop out)."""
    small, large, block = count_step(preset, batch), count_step(preset, 2 * batch), count_block(preset, batch)
    grown = {name: large.bytes[name] - small.bytes[name] for name in large.bytes}
    total, moved = sum(grown.values()), sum(b for n, b in grown.items() if n in MOVEMENT_NAMES)
    mib = 2.0 ** 20
    lines = [f"preset {preset}, batch {batch} and {2 * batch}, bf16 autocast on the CPU, backend {_backend()}",
             f"bytes written per sample (what grows with the batch): {total / mib / batch:.1f} MiB",
             f"data movement: {moved / mib / batch:.2f} MiB per sample, {100 * moved / max(total, 1):.2f}% of those bytes",
             "largest movement operators (MiB per sample; calls in one step):"]
    for name, b in sorted(((n, b) for n, b in grown.items() if n in MOVEMENT_NAMES), key=lambda p: -p[1])[:6]:
        lines.append(f"  {name:24s} {b / mib / batch:8.2f}  {small.calls[name]}")
    lines.append(f"operators per encoder block, forward + backward (our ops counted once): {sum(block.calls.values())}")
    return "\n".join(lines)


def _backend() -> str:
    import aimv2_kernels as ak

    return ak.get_backend()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_movement", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="large")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", default="torch", help="aimv2_kernels backend for the step (default torch)")
    args = parser.parse_args(argv)
    import aimv2_kernels as ak

    ak.set_backend(args.backend)
    print(report(args.preset, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
