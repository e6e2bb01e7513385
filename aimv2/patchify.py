"""Patches and prefixes: the pixel targets and the prefix lengths of AIMv2 pre-training.

Patch order matches the patch-embedding conv: patch index n = h * grid + w (row-major), and within a
patch the values run (p, q, c), pixel row, pixel column, channel, so `patchify(x)[:, n] @ W.T` with the
conv weight W (D, c, p, q) permuted to (D, p, q, c) equals the conv output at patch n.
"""
from __future__ import annotations

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C) in (h, w, p, q, c) order; H and W multiples of patch_size."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"images of size {H}x{W} do not split into {p}x{p} patches")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, c, h, p, w, q)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, q, c)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3, grid: tuple[int, int] | None = None) -> Tensor:
    """Inverse of `patchify`: (B, N, p * p * C) -> (B, C, H, W) for a grid of (h, w) patches, by
    default the square one."""
    B, N, P = patches.shape
    p = patch_size
    h, w = grid if grid is not None else (int(round(N ** 0.5)),) * 2
    if h * w != N or P != p * p * channels:
        raise ValueError(f"patches of shape {tuple(patches.shape)} are not a {h}x{w} grid of {p}x{p}x{channels} patches")
    x = patches.reshape(B, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, c, h, p, w, q)
    return x.reshape(B, channels, h * p, w * p)


def sample_prefix_len(batch: int, num_patches: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """Prefix lengths uniform in {1, ..., N - 1}, one per sample: int64 (B,) on `device`.

    Without a generator this draws from torch's global RNG of `device` (the CUDA generator for CUDA
    tensors), so restoring the RNG state on resume reproduces the draws.
    """
    if num_patches < 2:
        raise ValueError(f"num_patches must be >= 2 to sample a prefix in 1..N-1, got {num_patches}")
    return torch.randint(1, num_patches, (batch,), device=device, generator=generator)


def resolve_prefix_len(prefix_len, batch: int, num_patches: int, *, training: bool, eval_default: int | None,
                       device) -> Tensor:
    """The (B,) int prefix tensor a forward uses.

    prefix_len None: sampled uniform in 1..N-1 when training, else `eval_default` (None -> N // 2)
    for every sample, so validation losses are deterministic. An int is broadcast; a tensor (B,) is
    moved to `device`. Values must lie in 0..N (checked on the host for ints and CPU tensors only, so
    a CUDA tensor never forces a synchronization, nor a traced one a graph break).
    """
    if prefix_len is None:
        if training:
            return sample_prefix_len(batch, num_patches, device)
        prefix_len = num_patches // 2 if eval_default is None else eval_default
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, Tensor)):
        raise TypeError(f"prefix_len must be None, an int or an int tensor of shape (B,), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= num_patches:
            raise ValueError(f"prefix_len must be in [0, {num_patches}], got {prefix_len}")
        return torch.full((batch,), prefix_len, dtype=torch.long, device=device)
    if prefix_len.dtype not in (torch.int32, torch.int64) or tuple(prefix_len.shape) != (batch,):
        raise ValueError(f"prefix_len must be an int32/int64 tensor of shape ({batch},), got {prefix_len.dtype} "
                         f"{tuple(prefix_len.shape)}")
    checkable = prefix_len.device.type == "cpu" and not torch.compiler.is_compiling()
    if checkable and prefix_len.numel() and not (
            0 <= int(prefix_len.min()) and int(prefix_len.max()) <= num_patches):
        raise ValueError(f"prefix_len values must be in [0, {num_patches}], got {prefix_len.tolist()}")
    return prefix_len.to(device, non_blocking=True)


def target_mask(prefix_len: Tensor, num_patches: int) -> Tensor:
    """Bool (B, N - 1): entry i is True when patch i + 1, the target of image position i, counts.

    A patch counts iff its index is >= the sample's prefix length (prefix patches are only context).
    """
    targets = torch.arange(1, num_patches, device=prefix_len.device)  # (N - 1,) indices of predicted patches
    return targets.unsqueeze(0) >= prefix_len.unsqueeze(1)


def resolve_packed_prefix_len(prefix_len, lengths: list[int], *, training: bool, eval_default: int | None,
                              device, generator: torch.Generator | None = None) -> Tensor:
    """The (n,) int prefix tensor of a packed batch of images with N_i = lengths[i] patches.

    As `resolve_prefix_len`, per image: None draws uniform in 1..N_i - 1 when training (each image
    needs N_i >= 2), else uses `eval_default` capped at N_i (None -> N_i // 2); an int is broadcast;
    values must lie in 0..N_i (checked for ints and CPU tensors)."""
    n = len(lengths)
    sizes = torch.tensor(lengths, dtype=torch.long)
    if prefix_len is None:
        if training:
            if min(lengths) < 2:
                raise ValueError(f"every image needs at least 2 patches to sample a prefix in 1..N-1, got {min(lengths)}")
            draws = torch.rand(n, generator=generator, dtype=torch.float64)  # host: the same draws on any device
            return ((draws * (sizes - 1)).long().clamp_max(sizes - 2) + 1).to(device, non_blocking=True)
        default = sizes // 2 if eval_default is None else sizes.clamp_max(eval_default)
        return default.to(device, non_blocking=True)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, Tensor)):
        raise TypeError(f"prefix_len must be None, an int or an int tensor of shape (n,), got {type(prefix_len).__name__}")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= min(lengths):
            raise ValueError(f"prefix_len must be in [0, {min(lengths)}] (the smallest image's patches), got {prefix_len}")
        return torch.full((n,), prefix_len, dtype=torch.long, device=device)
    if prefix_len.dtype not in (torch.int32, torch.int64) or tuple(prefix_len.shape) != (n,):
        raise ValueError(f"prefix_len must be an int32/int64 tensor of shape ({n},), one per image, got "
                         f"{prefix_len.dtype} {tuple(prefix_len.shape)}")
    if prefix_len.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ((prefix_len < 0) | (prefix_len > sizes)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(f"prefix_len[{i}] = {int(prefix_len[i])} is outside [0, {lengths[i]}] (image {i}'s patches)")
    return prefix_len.to(device, non_blocking=True)
