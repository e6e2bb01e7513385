"""Native-resolution batches: images of their own sizes packed into micro-batches by a patch budget.

Fixed-size batches would waste the budget on small images or overflow it with large ones, so a
micro-batch here is as many consecutive samples as fit in `budget` patch tokens:

* `PatchSamples` turns a `CaptionDataset` sample into patches (N_i, P) and its grid (h_i, w_i), so
  DataLoader workers patchify in parallel.
* `PackedBatches` streams this rank's samples in order through a DataLoader and cuts the stream
  into micro-batches: a sample joins the batch while the batch stays within the budget; the first
  one that does not fit opens the next batch. No sample is dropped or reordered.

Rank r of `world` takes global sample positions r, r + world, r + 2 * world, ...; its k-th item is
position r + k * world, mapped to (epoch, index) by `SampleOrder`. Every batch carries `cursor`, the
number of this rank's items in the batches yielded so far: `PackedBatches(..., start=cursor)`
continues with exactly the batches that would have followed, which is all a checkpoint stores.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from ..packing import PackedImages
from ..patchify import patchify
from .loader import CaptionDataset, SampleOrder


class PatchSamples:
    """(epoch, index) -> {"patches": (N, P) float32, "grid": (h, w), "tokens": (L,) int64, "skipped": int}."""

    def __init__(self, dataset: CaptionDataset, patch_size: int):
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.dataset = dataset
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        sample = self.dataset[key]
        image = sample["image"]  # (3, H, W), sides multiples of patch_size
        _, H, W = image.shape
        return {
            "patches": patchify(image.unsqueeze(0), self.patch_size)[0],  # (h * w, p * p * 3)
            "grid": (H // self.patch_size, W // self.patch_size),
            "tokens": sample["tokens"],
            "skipped": sample["skipped"],
        }


class _RankKeys:
    """Infinite iterable of this rank's (epoch, index) keys, from its item `start` on."""

    def __init__(self, order: SampleOrder, rank: int, world: int, start: int):
        self.order = order
        self.rank = rank
        self.world = world
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        k = self.start
        while True:
            yield self.order.key(self.rank + k * self.world)
            k += 1


def _as_is(sample: dict) -> dict:
    """collate_fn for single samples: keeps the grid a tuple (the default would make it a list)."""
    return sample


class PackedBatches:
    """Infinite iterable of this rank's micro-batches of at most `budget` patches:

    {"images": PackedImages (CPU), "tokens": (n, L) int64, "skipped": int, "cursor": int}.
    """

    def __init__(self, samples: PatchSamples, order: SampleOrder, budget: int, rank: int = 0, world: int = 1,
                 start: int = 0, workers: int = 0, pin_memory: bool = False, worker_init_fn=None):
        if budget < 1:
            raise ValueError(f"budget must be a positive number of patches, got {budget}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {rank}, world {world}")
        if start < 0:
            raise ValueError(f"start must be a non-negative stream position, got {start}")
        self.samples = samples
        self.order = order
        self.budget = budget
        self.rank = rank
        self.world = world
        self.start = start
        self.workers = workers
        # the packed batch is pinned, not the samples the DataLoader hands over (they are concatenated
        # on the host); pinning needs CUDA, without which the DataLoader would also skip it
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.worker_init_fn = worker_init_fn

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.samples,
            batch_size=None,
            sampler=_RankKeys(self.order, self.rank, self.world, self.start),
            collate_fn=_as_is,
            num_workers=self.workers,
            prefetch_factor=4 if self.workers > 0 else None,
            worker_init_fn=self.worker_init_fn if self.workers > 0 else None,
        )

    def __iter__(self) -> Iterator[dict]:
        cursor = self.start  # this rank's items in the batches yielded so far
        batch: list[dict] = []
        used = 0  # patches in `batch`
        for k, sample in enumerate(self._loader(), start=self.start):
            n = sample["patches"].shape[0]
            if n > self.budget:
                h, w = sample["grid"]
                raise ValueError(
                    f"item {k} of rank {self.rank}'s stream has a grid of {h}x{w} = {n} patches, more than the "
                    f"budget of {self.budget} patches per micro-batch: --max-tokens per micro-batch must be at "
                    f"least the per-image patch budget")
            if used + n > self.budget:  # opens the next batch
                cursor += len(batch)
                yield self._pack(batch, cursor)
                batch, used = [], 0
            batch.append(sample)
            used += n

    def _pack(self, batch: list[dict], cursor: int) -> dict:
        patches = torch.cat([s["patches"] for s in batch])  # (T, P)
        images = PackedImages.from_patches(patches, [s["grid"] for s in batch])
        tokens = torch.stack([s["tokens"] for s in batch])  # (n, L)
        if self.pin_memory:
            images, tokens = images.pin_memory(), tokens.pin_memory()
        return {"images": images, "tokens": tokens, "skipped": sum(s["skipped"] for s in batch), "cursor": cursor}
