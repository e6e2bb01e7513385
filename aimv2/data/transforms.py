"""Image pipeline with Pillow and torch: RandomResizedCrop, horizontal flip, mean/std normalization,
and for native-resolution training, resizing to whole patches under a patch budget.

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


def native_grid(width: int, height: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """(h, w) patches for an image of width x height px at native resolution: the aspect ratio kept
    (up to rounding each side down to whole patches), h * w <= max_patches, never scaled up except to
    reach one patch per side and two in all. Only an image thinner than 1 : max_patches loses its aspect
    ratio."""
    scale = min(1.0, math.sqrt(max_patches * patch_size ** 2 / (width * height)))
    h = max(1, math.floor(height * scale / patch_size))
    w = max(1, math.floor(width * scale / patch_size))
    if h * w > max_patches:  # only when one side was raised to 1 patch: cap the other
        h, w = min(h, max_patches), min(w, max_patches)
    if h * w < 2:  # one patch leaves nothing to predict: two along the longer side
        h, w = (1, 2) if width >= height else (2, 1)
    return h, w


class NativeTransform:
    """Native resolution for real photos: resize (bicubic) to the `native_grid` in whole patches,
    horizontal flip (p=0.5), normalize. No crop, so the caption still describes the whole image."""

    def __init__(self, patch_size: int, max_patches: int, flip: bool = True):
        if patch_size < 1 or max_patches < 1:
            raise ValueError(f"patch_size and max_patches must be positive, got {patch_size} and {max_patches}")
        self.patch_size = patch_size
        self.max_patches = max_patches
        self.flip = flip

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = image.convert("RGB")
        h, w = native_grid(image.width, image.height, self.patch_size, self.max_patches)
        size = (w * self.patch_size, h * self.patch_size)
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(image)


class NativeNormalize:
    """Normalize only, for images already drawn at a native size of whole patches (the built-in
    shapes, whose captions name positions a flip or resize would change); `rng` is ignored."""

    def __init__(self, patch_size: int):
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = patch_size

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if image.width % self.patch_size or image.height % self.patch_size:
            raise ValueError(f"image of {image.width}x{image.height} px: expected both sides to be multiples of "
                             f"the patch size {self.patch_size}")
        return to_normalized_tensor(image)
