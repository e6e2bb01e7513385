"""Image pipeline with Pillow and torch: RandomResizedCrop, horizontal flip, mean/std normalization.

Randomness comes from a numpy Generator the caller passes in, seeded per sample (see loader.py), so
an image's augmentation does not depend on which worker loads it or on where a run was resumed.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

# The image statistics AIMv2 (like CLIP) normalizes with.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering scale[0]..scale[1] of the area with an aspect
    ratio in `ratio` (log-uniform); after 10 failed draws, the largest centred crop within `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_normalized_tensor(image: Image.Image, mean=MEAN, std=STD) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, (x / 255 - mean) / std."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(array).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).contiguous()


class TrainTransform:
    """RandomResizedCrop(size, scale) + horizontal flip (p=0.5) + normalize."""

    def __init__(self, size: int, scale=(0.4, 1.0), flip: bool = True):
        self.size = size
        self.scale = scale
        self.flip = flip

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = image.convert("RGB")
        box = random_resized_crop_box(image.width, image.height, rng, self.scale)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image)


class EvalTransform:
    """Centre square crop resized to `size`, then normalize (no randomness; `rng` is ignored)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC, box=center_crop_box(image.width, image.height))
        return to_normalized_tensor(image)
