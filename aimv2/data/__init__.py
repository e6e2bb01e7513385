"""Training data: built-in shapes, tar shards and JSONL sources, tokenizers, transforms, the loader.

    source = open_source("builtin" | "shards/" | "data.tar" | "pairs.jsonl", image_size, seed)

Native resolution: images keep their own sizes and micro-batches are packed by a patch budget.

    source = open_source(data, image_size, seed, patch_size=p, max_patches=m)
    dataset = CaptionDataset(source, tokenizer, max_len, native_transform_for(source, p, m), seed)
    batches = PackedBatches(PatchSamples(dataset, p), SampleOrder(len(source), seed), budget)
"""
from __future__ import annotations

import os

from .jsonl import JsonlCaptions
from .loader import BatchKeys, BrokenDataError, CaptionDataset, SampleOrder, make_loader, micro_batch_size
from .packed import PackedBatches, PatchSamples
from .synthetic import KINDS, ShapesDataset
from .tokenizer import ByteTokenizer, load_tokenizer
from .transforms import EvalTransform, NativeNormalize, NativeTransform, TrainTransform
from .webdataset import TarShards

BUILTIN = "builtin"


def open_source(data: str, image_size: int, seed: int = 0, builtin_size: int = 1_000_000, *,
                patch_size: int | None = None, max_patches: int | None = None):
    """The source named by `data`: "builtin", a .jsonl file, a .tar shard or a directory of shards.

    patch_size and max_patches draw the built-in shapes at native sizes (see ShapesDataset); real
    images come at their own sizes anyway, and `native_transform_for` fits them to the budget."""
    if data == BUILTIN:
        return ShapesDataset(image_size, seed=seed, length=builtin_size, patch_size=patch_size, max_patches=max_patches)
    if data.endswith(".jsonl"):
        return JsonlCaptions(data)
    if data.endswith(".tar") or os.path.isdir(data):
        return TarShards(data)
    expected = "expected 'builtin', a .jsonl file, a .tar shard or a directory of shards"
    if os.path.exists(data) or os.path.splitext(data)[1]:  # a file of another kind
        raise ValueError(f"--data {data!r}: {expected}")
    raise FileNotFoundError(f"--data {data!r} does not exist ({expected})")


def transform_for(source, image_size: int):
    """Built-in images are drawn at the final size and their captions name positions and sizes, so
    they are only normalized; real images get RandomResizedCrop(scale 0.4-1) and flips."""
    if isinstance(source, ShapesDataset):
        return EvalTransform(image_size)
    return TrainTransform(image_size)


def native_transform_for(source, patch_size: int, max_patches: int):
    """Native resolution: built-in images are drawn at a size of whole patches and only normalized;
    real images are resized to at most `max_patches` patches, keeping their aspect ratio, and flipped."""
    if isinstance(source, ShapesDataset):
        return NativeNormalize(patch_size)
    return NativeTransform(patch_size, max_patches)


__all__ = [
    "BUILTIN",
    "BatchKeys",
    "BrokenDataError",
    "ByteTokenizer",
    "CaptionDataset",
    "EvalTransform",
    "JsonlCaptions",
    "KINDS",
    "NativeNormalize",
    "NativeTransform",
    "PackedBatches",
    "PatchSamples",
    "SampleOrder",
    "ShapesDataset",
    "TarShards",
    "TrainTransform",
    "load_tokenizer",
    "make_loader",
    "micro_batch_size",
    "native_transform_for",
    "open_source",
    "transform_for",
]
