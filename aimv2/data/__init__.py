"""Training data: built-in shapes, tar shards and JSONL sources, tokenizers, transforms, the loader.

    source = open_source("builtin" | "shards/" | "data.tar" | "pairs.jsonl", image_size, seed)
"""
from __future__ import annotations

import os

from .jsonl import JsonlCaptions
from .loader import BatchKeys, CaptionDataset, SampleOrder, make_loader, micro_batch_size
from .synthetic import KINDS, ShapesDataset
from .tokenizer import ByteTokenizer, load_tokenizer
from .transforms import EvalTransform, TrainTransform
from .webdataset import TarShards

BUILTIN = "builtin"


def open_source(data: str, image_size: int, seed: int = 0, builtin_size: int = 1_000_000):
    """The source named by `data`: "builtin", a .jsonl file, a .tar shard or a directory of shards."""
    if data == BUILTIN:
        return ShapesDataset(image_size, seed=seed, length=builtin_size)
    if data.endswith(".jsonl"):
        return JsonlCaptions(data)
    if data.endswith(".tar") or os.path.isdir(data):
        return TarShards(data)
    raise ValueError(f"--data {data!r}: expected 'builtin', a .jsonl file, a .tar shard or a directory of shards")


def transform_for(source, image_size: int):
    """Built-in images are drawn at the final size and their captions name positions and sizes, so
    they are only normalized; real images get RandomResizedCrop(scale 0.4-1) and flips."""
    if isinstance(source, ShapesDataset):
        return EvalTransform(image_size)
    return TrainTransform(image_size)


__all__ = [
    "BUILTIN",
    "BatchKeys",
    "ByteTokenizer",
    "CaptionDataset",
    "EvalTransform",
    "JsonlCaptions",
    "KINDS",
    "SampleOrder",
    "ShapesDataset",
    "TarShards",
    "TrainTransform",
    "load_tokenizer",
    "make_loader",
    "micro_batch_size",
    "open_source",
    "transform_for",
]
