"""From a data source to training batches: sample order, tokenization, skipping of bad samples.

A *source* is map-style: `len(source)` and `source.load(i) -> (PIL image, caption)`, raising when
sample i cannot be read (`ShapesDataset`, `TarShards`, `JsonlCaptions`). On top of it:

* `SampleOrder` maps a global sample position p = 0, 1, 2, ... to (epoch, index): each epoch is a
  permutation of the source drawn from (seed, epoch). The position is all a checkpoint needs to store.
* `BatchKeys` cuts that stream into the micro-batches of one rank. Step s takes positions
  [s * B, (s + 1) * B) of the global batch B; accumulation micro-batch m and rank r take their slice
  of it, so any (ranks x accumulation) split of a step sees the same B samples.
* `CaptionDataset` loads one (epoch, index) key: the image goes through the transform with a
  generator seeded by (seed, epoch, index), so the result does not depend on worker or resume point;
  the caption is tokenized. A sample that fails to load is replaced by the next index and counted.
* `make_loader` wraps these in a torch DataLoader with worker processes.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

log = logging.getLogger("aimv2.data")

# consecutive unreadable samples after which the data is declared broken rather than skipped
MAX_CONSECUTIVE_FAILURES = 32
# each process logs the first few skipped samples, then only counts them
_LOGGED_FAILURES_LIMIT = 10


class BrokenDataError(RuntimeError):
    """MAX_CONSECUTIVE_FAILURES samples in a row could not be read: the data, not one sample, is
    broken. The message says which source and files, how many samples were tried and why the last
    failed, on one line."""

    def __init__(self, message: str):
        # A DataLoader worker's exception reaches the training process re-created from one string:
        # "Caught BrokenDataError in DataLoader worker process 0. Original Traceback ...". Keep
        # only our own line, its last line, so the command can print it as it is.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class SampleOrder:
    """Global sample position -> (epoch, index), with a fresh permutation per epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size < 1:
            raise ValueError(f"the dataset is empty (size {size})")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return epoch, offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return epoch, int(self._perm[offset])


class BatchKeys:
    """Infinite iterable of this rank's micro-batches (lists of (epoch, index)) from `start_step` on."""

    def __init__(self, order: SampleOrder, global_batch: int, grad_accum: int = 1, rank: int = 0, world: int = 1, start_step: int = 0):
        self.micro = micro_batch_size(global_batch, grad_accum, world)
        self.order = order
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world = world
        self.start_step = start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for m in range(self.grad_accum):
                first = step * self.global_batch + (m * self.world + self.rank) * self.micro
                yield [self.order.key(p) for p in range(first, first + self.micro)]
            step += 1


def micro_batch_size(global_batch: int, grad_accum: int, world: int) -> int:
    parts = grad_accum * world
    if global_batch < 1 or grad_accum < 1 or global_batch % parts:
        raise ValueError(
            f"batch size {global_batch} must be a positive multiple of grad_accum ({grad_accum}) x processes ({world})"
        )
    return global_batch // parts


class CaptionDataset:
    """(epoch, index) -> {"image": (3, H, W) float, "tokens": (T,) int64, "skipped": int}."""

    def __init__(self, source, tokenizer, max_len: int, transform: Callable, seed: int):
        self.source = source
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.transform = transform
        self.seed = seed
        self._logged = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        failures = []  # (sample index, exception)
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            i = (index + attempt) % len(self.source)
            try:
                image, caption = self.source.load(i)
                rng = np.random.default_rng([self.seed, epoch, i])
                pixels = self.transform(image, rng)
            except Exception as exc:  # any decode/IO error of one sample: skip it, never the run
                failures.append((i, exc))
                if self._logged < _LOGGED_FAILURES_LIMIT:
                    self._logged += 1
                    log.warning("skipping unreadable sample %d: %s: %s", i, type(exc).__name__, exc)
                continue
            tokens = self.tokenizer.encode_padded(caption, self.max_len)
            return {"image": pixels, "tokens": tokens, "skipped": attempt}
        raise BrokenDataError(self._broken(failures))

    def _broken(self, failures: list) -> str:
        """One line: the source, the samples tried and where they live, and the last reason."""
        first, last = failures[0][0], failures[-1][0]
        locate = getattr(self.source, "locate", None)
        where = f" ({locate(first)} .. {locate(last)})" if locate else ""
        reason = " ".join(f"{type(failures[-1][1]).__name__}: {failures[-1][1]}".split())
        return (f"the data looks broken: {len(failures)} consecutive samples could not be read, indices {first} to "
                f"{last}{where} of {self.source.describe()}; the last failed with {reason}")


def collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),   # (B, 3, H, W)
        "tokens": torch.stack([s["tokens"] for s in samples]),  # (B, T)
        "skipped": sum(s["skipped"] for s in samples),
    }


def make_loader(dataset: CaptionDataset, keys: BatchKeys, workers: int = 0, pin_memory: bool = False, worker_init_fn=None) -> DataLoader:
    """A DataLoader over `keys` (infinite); iterate it with next()."""
    return DataLoader(
        dataset,
        batch_sampler=keys,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=worker_init_fn if workers > 0 else None,
    )
