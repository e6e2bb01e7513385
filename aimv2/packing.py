"""Packed native-resolution batches: n images of their own sizes as one sequence of patches.

Image i has a grid of h_i x w_i patches, N_i = h_i * w_i. Its patches (row-major, each patch in the
(p, q, c) order of `patchify`) are rows cu_seqlens[i] .. cu_seqlens[i + 1] - 1 of `patches` (T, P),
T = sum N_i. The grid stays on the host as Python ints: it decides index tensors and `max_seqlen`,
which the kernels take as a host int, so nothing here ever reads a device tensor back.

The decoder packs each image's sequence [N_i image tokens | BOS | L text tokens] the same way;
`DecoderLayout` holds the index tensors that scatter image features and text embeddings into that
order and gather the outputs back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .patchify import patchify


def _cu_seqlens(lengths: Sequence[int]) -> Tensor:
    """(n + 1,) int32 prefix sums of `lengths`, starting at 0."""
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)


def grid_of(image: Tensor, patch_size: int) -> tuple[int, int]:
    """(h, w) patches of a (C, H, W) image; H and W must be multiples of patch_size."""
    if not isinstance(image, Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"each image must be a (C, H, W) tensor, got {shape}")
    _, H, W = image.shape
    if H % patch_size or W % patch_size or H == 0 or W == 0:
        raise ValueError(f"image sides must be positive multiples of the patch size {patch_size}, got {H}x{W}")
    return H // patch_size, W // patch_size


@dataclass(frozen=True)
class PackedImages:
    """n images as one (T, P) sequence of pixel patches.

    patches:    (T, P) float, image after image, P = patch_size**2 * channels.
    grid:       ((h_0, w_0), ...) patches per image column and row (host ints).
    cu_seqlens: (n + 1,) int32 on the patches' device: image i is rows cu_seqlens[i]:cu_seqlens[i+1].
    """

    patches: Tensor
    grid: tuple[tuple[int, int], ...]
    cu_seqlens: Tensor

    @classmethod
    def from_patches(cls, patches: Tensor, grid: Sequence[tuple[int, int]]) -> "PackedImages":
        grid = tuple((int(h), int(w)) for h, w in grid)
        if not grid or any(h < 1 or w < 1 for h, w in grid):
            raise ValueError(f"grid must list at least one image of at least 1x1 patches, got {grid}")
        total = sum(h * w for h, w in grid)
        if patches.dim() != 2 or patches.shape[0] != total:
            raise ValueError(f"patches must have shape ({total}, P) for grid {grid}, got {tuple(patches.shape)}")
        cu = _cu_seqlens([h * w for h, w in grid]).to(patches.device, non_blocking=True)
        return cls(patches, grid, cu)

    @classmethod
    def from_images(cls, images: Sequence[Tensor], patch_size: int) -> "PackedImages":
        """Pack a list of (C, H_i, W_i) images (each side a multiple of patch_size)."""
        if isinstance(images, Tensor) or len(images) == 0:
            raise ValueError("images must be a non-empty list of (C, H, W) tensors")
        grid = [grid_of(image, patch_size) for image in images]
        channels = {image.shape[0] for image in images}
        if len(channels) != 1:
            raise ValueError(f"all images must have the same number of channels, got {sorted(channels)}")
        patches = torch.cat([patchify(image.unsqueeze(0), patch_size)[0] for image in images])  # (T, P)
        return cls.from_patches(patches, grid)

    # ---- sizes (host ints) ----
    @property
    def lengths(self) -> list[int]:
        """N_i: patches per image."""
        return [h * w for h, w in self.grid]

    @property
    def num_images(self) -> int:
        return len(self.grid)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        """T: patches of all images."""
        return self.patches.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PackedImages":
        return PackedImages(self.patches.to(device, non_blocking=non_blocking), self.grid,
                            self.cu_seqlens.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedImages":
        """For DataLoader(pin_memory=True)."""
        return PackedImages(self.patches.pin_memory(), self.grid, self.cu_seqlens.pin_memory())

    # ---- per-patch coordinates and per-image views ----
    def coordinates(self) -> tuple[Tensor, Tensor]:
        """(row, column) of every patch in its image: two int64 (T,) tensors on the patches' device."""
        heights, widths = torch.tensor(self.grid, dtype=torch.int64).unbind(1)  # (n,) each
        lengths = heights * widths
        image = torch.repeat_interleave(torch.arange(self.num_images), lengths)  # (T,) image of each patch
        within = torch.arange(self.total) - (lengths.cumsum(0) - lengths)[image]  # patch index in its image
        device = self.patches.device
        return ((within // widths[image]).to(device, non_blocking=True),
                (within % widths[image]).to(device, non_blocking=True))

    def split(self, x: Tensor) -> list[Tensor]:
        """(T, ...) -> one (N_i, ...) view per image."""
        return list(x.split(self.lengths))

    def target_rows(self) -> Tensor:
        """(T - n,) int64 on the patches' device: the rows the shifted pixel objective predicts,
        patches 1 .. N_i - 1 of each image (every patch but each image's first)."""
        keep = torch.ones(self.total, dtype=torch.bool)
        keep[torch.tensor([0, *self.lengths[:-1]]).cumsum(0)] = False
        return keep.nonzero().squeeze(1).to(self.patches.device, non_blocking=True)

    def target_mask(self, prefix_len: Tensor) -> Tensor:
        """Bool (M,) over the predicted patches (in `target_rows()` order): patch k of image i
        (k = 1 .. N_i - 1) counts iff k >= prefix_len[i]."""
        lengths = torch.tensor(self.lengths, device=prefix_len.device)
        image = torch.repeat_interleave(torch.arange(self.num_images, device=prefix_len.device), lengths - 1)
        starts = torch.cumsum(lengths - 1, 0) - (lengths - 1)  # first predicted row of each image
        index = torch.arange(image.shape[0], device=prefix_len.device) - starts[image] + 1  # k of each row
        return index >= prefix_len[image]


@dataclass(frozen=True)
class DecoderLayout:
    """Where each image's [N_i image | BOS | L text] sequence lies in the packed decoder input.

    order:      (S,) gather index into cat([image features (T, d), text (n * (L + 1), d)]) that
                yields the packed decoder sequence, S = T + n * (L + 1).
    pixel_rows: (T - n,) decoder rows whose outputs predict patches 1 .. N_i - 1 of each image.
    text_rows:  (n, L) decoder rows whose outputs predict caption tokens 0 .. L - 1 (BOS, tokens).
    cu_seqlens: (n + 1,) int32 sequence bounds; max_seqlen: the longest, a host int.
    """

    order: Tensor
    pixel_rows: Tensor
    text_rows: Tensor
    cu_seqlens: Tensor
    max_seqlen: int

    @classmethod
    def build(cls, lengths: Sequence[int], text_len: int, device) -> "DecoderLayout":
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        n, T, L = len(lengths), int(lengths_t.sum()), text_len
        seq_lengths = lengths_t + L + 1
        seq_starts = seq_lengths.cumsum(0) - seq_lengths  # (n,)
        image_starts = lengths_t.cumsum(0) - lengths_t  # (n,) first patch of each image in the encoder output
        image_of_row = torch.repeat_interleave(torch.arange(n), seq_lengths)  # (S,)
        pos = torch.arange(int(seq_lengths.sum())) - seq_starts[image_of_row]  # position within its sequence
        is_image = pos < lengths_t[image_of_row]
        order = torch.where(is_image, image_starts[image_of_row] + pos,
                            T + image_of_row * (L + 1) + pos - lengths_t[image_of_row])
        pixel = (pos < lengths_t[image_of_row] - 1).nonzero().squeeze(1)  # image positions but each image's last
        text = (seq_starts + lengths_t).unsqueeze(1) + torch.arange(L)  # (n, L)
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return cls(move(order), move(pixel), move(text), move(_cu_seqlens(seq_lengths.tolist())), int(seq_lengths.max()))
