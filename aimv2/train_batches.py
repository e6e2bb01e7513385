"""What one optimizer step trains on: square batches of a fixed image count, or native-resolution
batches packed to a token budget. Both hand the trainer a list of `MicroBatch`es (one per
accumulation step) with the host-side counts that weight each micro-batch's loss.

Square: step s takes global sample positions [s * B, (s + 1) * B) (loader.BatchKeys); prefix lengths
come from a generator seeded by (seed, step), drawn for the whole global batch and sliced, so any
(processes x accumulation) split of a step trains on the same samples with the same prefixes.

Native: each process reads its own share of the sample stream (positions rank, rank + world, ...)
and fills each micro-batch with whole images while their patches fit the budget
(data.packed.PackedBatches); prefixes are drawn per image from (seed, step, rank, micro-batch).
The batches depend on the split, since the budget is per micro-batch. A checkpoint stores every
process's stream cursor, so a resumed run continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import BatchKeys, PackedBatches, PatchSamples, SampleOrder, make_loader
from .distributed import DistInfo, all_reduce_sum
from .packing import PackedImages
from .patchify import resolve_packed_prefix_len


@dataclass
class MicroBatch:
    inputs: Tensor | PackedImages  # (b, C, H, W) images, or packed images; on the host
    tokens: Tensor  # (b, L) int64 caption tokens
    prefix: Tensor  # (b,) int64 prefix lengths
    pixels: int  # patches the pixel loss counts (those at or after each prefix, after the first)
    words: int  # caption tokens the text loss counts
    images: int
    skipped: int  # unreadable samples replaced while loading


def _words(tokens: Tensor, pad_id: int) -> int:
    return int((tokens != pad_id).sum())


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = value * 1_000_003 + part
    return value % (2 ** 63)


class SquareBatches:
    def __init__(self, dataset, source_size: int, seed: int, global_batch: int, grad_accum: int, info: DistInfo,
                 num_patches: int, pad_id: int, workers: int, worker_init_fn, start_step: int):
        self.seed, self.global_batch, self.grad_accum, self.info = seed, global_batch, grad_accum, info
        self.num_patches, self.pad_id = num_patches, pad_id
        keys = BatchKeys(SampleOrder(source_size, seed), global_batch, grad_accum, info.rank, info.world, start_step=start_step)
        self.micro = keys.micro
        self.source_size = source_size
        loader = make_loader(dataset, keys, workers, pin_memory=info.device.type == "cuda", worker_init_fn=worker_init_fn)
        self.batches = iter(loader)

    def _prefix_lengths(self, step: int) -> Tensor:
        """(global_batch,) int64 in 1..N-1, a pure function of (seed, step), sliced per rank and
        micro-batch in the same layout as the data (BatchKeys)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        return torch.randint(1, self.num_patches, (self.global_batch,), generator=generator)

    def next_step(self, step: int) -> list[MicroBatch]:
        prefix_all = self._prefix_lengths(step)
        out = []
        for m in range(self.grad_accum):
            batch = next(self.batches)
            start = (m * self.info.world + self.info.rank) * self.micro
            prefix = prefix_all[start:start + self.micro]
            out.append(MicroBatch(batch["image"], batch["tokens"], prefix, int((self.num_patches - prefix).sum()),
                                  _words(batch["tokens"], self.pad_id), len(prefix), batch["skipped"]))
        return out

    def state(self, step: int) -> dict:
        return {"samples_seen": step * self.global_batch, "dataset_size": self.source_size,
                "batch_size": self.global_batch, "seed": self.seed}

    def describe(self) -> str:
        return f"batch {self.global_batch} ({self.micro} per micro-batch x {self.grad_accum} accumulation x {self.info.world})"


class NativeBatches:
    def __init__(self, dataset, source_size: int, seed: int, max_tokens: int, max_patches: int, grad_accum: int,
                 info: DistInfo, patch_size: int, pad_id: int, workers: int, worker_init_fn, saved: dict | None):
        self.seed, self.grad_accum, self.info, self.pad_id = seed, grad_accum, info, pad_id
        self.max_tokens, self.source_size = max_tokens, source_size
        self.budget = max_tokens // (grad_accum * info.world)  # patches per micro-batch and process
        if self.budget < max_patches:
            raise ValueError(
                f"--max-tokens {max_tokens} gives {self.budget} patches per micro-batch ({grad_accum} accumulation x "
                f"{info.world} processes), fewer than one image may have (--max-patches {max_patches}); raise "
                f"--max-tokens to at least {max_patches * grad_accum * info.world}")
        self.cursor = self._start(saved)
        self.batches = iter(PackedBatches(PatchSamples(dataset, patch_size), SampleOrder(source_size, seed), self.budget,
                                          info.rank, info.world, start=self.cursor, workers=workers,
                                          pin_memory=info.device.type == "cuda", worker_init_fn=worker_init_fn))

    def _start(self, saved: dict | None) -> int:
        if not saved:
            return 0
        cursors = saved.get("cursors")
        if cursors is None or len(cursors) != self.info.world or saved.get("dataset_size") != self.source_size:
            raise ValueError("the checkpoint's data position does not fit this run (another number of processes, "
                             "another dataset, or a square-image run); resume with the run's own settings")
        return int(cursors[self.info.rank])

    def next_step(self, step: int) -> list[MicroBatch]:
        out = []
        for m in range(self.grad_accum):
            batch = next(self.batches)
            packed: PackedImages = batch["images"]
            generator = torch.Generator().manual_seed(_seed(self.seed, step, self.info.rank, m))
            prefix = resolve_packed_prefix_len(None, packed.lengths, training=True, eval_default=None, device="cpu",
                                               generator=generator)
            pixels = sum(n - max(int(p), 1) for n, p in zip(packed.lengths, prefix))
            out.append(MicroBatch(packed, batch["tokens"], prefix, pixels, _words(batch["tokens"], self.pad_id),
                                  packed.num_images, batch["skipped"]))
            self.cursor = batch["cursor"]
        return out

    def state(self, step: int) -> dict:
        """Every process's stream cursor (a collective: every process calls it)."""
        cursors = torch.zeros(self.info.world, dtype=torch.float64, device=self.info.device)
        cursors[self.info.rank] = self.cursor
        all_reduce_sum(cursors, self.info)
        return {"cursors": [int(c) for c in cursors.tolist()], "dataset_size": self.source_size,
                "max_tokens": self.max_tokens, "seed": self.seed}

    def describe(self) -> str:
        return (f"up to {self.max_tokens} patches per step ({self.budget} per micro-batch x {self.grad_accum} "
                f"accumulation x {self.info.world})")
