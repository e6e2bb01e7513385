"""The AIMv2 vision encoder: patch conv, patch RMSNorm, positions, prefix-attention blocks.

Positions are a learned (1, N, D) table for the fixed image size, or with `config.native` the 2-D
sinusoidal embedding of each image's own grid (positions.py). A native encoder also runs packed
batches (`PackedImages`): images of different sizes as one sequence, attention kept inside each.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aimv2_kernels as ak

from .blocks import init_weights, make_blocks, run_blocks
from .config import AIMv2Config
from .interop import config_from_transformers, state_dict_from_transformers, state_dict_to_transformers
from .packing import PackedImages
from .pretrained import read_pretrained
from .positions import sincos_2d, sincos_grid


class AIMv2Encoder(nn.Module):
    """images (B, C, H, W) -> features (B, N, enc_dim); packed images (PackedImages) -> (T, enc_dim).

    State-dict keys: patch_embed.{weight,bias}, patch_norm.weight, pos_embed (1, N, D) (not in a
    native encoder), blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,mlp.fc3}.weight,
    norm.weight.
    """

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.enc_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_norm = ak.nn.RMSNorm(c.enc_dim, eps=c.norm_eps)
        if c.native:
            self.register_parameter("pos_embed", None)
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.enc_dim))
        self.blocks = make_blocks(c.enc_dim, c.enc_depth, c.enc_heads, c.enc_hidden, c.norm_eps)
        self.norm = ak.nn.RMSNorm(c.enc_dim, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        if c.native:
            p = c.patch_size
            if (not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != c.channels
                    or images.shape[2] % p or images.shape[3] % p or images.shape[2] * images.shape[3] == 0):
                raise ValueError(f"images must have shape (B, {c.channels}, H, W) with H and W positive multiples of "
                                 f"the patch size {p}, got {shape}")
        elif not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must have shape (B, {c.channels}, {c.image_size}, {c.image_size}), got {shape}"
                             + ("" if isinstance(images, Tensor) else "; a list of images of different sizes needs a "
                                "native-resolution encoder (AIMv2Config(native=True))"))
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalized pixels), got {images.dtype}")

    def embed_parts(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (patch tokens (B, N, D): conv then RMSNorm, positions: the position
        embedding broadcast to (B, N, D), a view). Their sum is the blocks' input."""
        self._check_images(images)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        tokens = self.patch_norm(x.flatten(2).transpose(1, 2))  # (B, N, D), row-major patch order
        if self.pos_embed is None:
            weight = self.patch_embed.weight
            positions = sincos_grid(x.shape[2], x.shape[3], self.config.enc_dim, weight.device, weight.dtype)  # (N, D)
            return tokens, positions.expand(tokens.shape[0], -1, -1)
        return tokens, self.pos_embed.expand(tokens.shape[0], -1, -1)

    def embed_packed(self, packed: PackedImages) -> tuple[Tensor, Tensor]:
        """Packed images -> (patch tokens (T, D), positions (T, D)), as `embed_parts` per image.

        The conv with kernel = stride = patch is a matmul over patches: its weight (D, C, p, q)
        permuted to (D, p, q, C) meets the (p, q, c) order of the packed patches, one GEMM for all."""
        c = self.config
        if not isinstance(packed, PackedImages):
            raise TypeError(f"expected PackedImages, got {type(packed).__name__}")
        if packed.patches.shape[1] != c.patch_dim or not packed.patches.is_floating_point():
            raise ValueError(f"packed patches must be float (T, {c.patch_dim}) for {c.patch_size}x{c.patch_size}x"
                             f"{c.channels} patches, got {packed.patches.dtype} {tuple(packed.patches.shape)}")
        weight = self.patch_embed.weight  # (D, C, p, q)
        matrix = weight.permute(0, 2, 3, 1).reshape(c.enc_dim, c.patch_dim)  # (D, P) in (p, q, c) order
        tokens = self.patch_norm(F.linear(packed.patches.to(weight.dtype), matrix, self.patch_embed.bias))  # (T, D)
        if self.pos_embed is None:
            rows, cols = packed.coordinates()
            extent = max(max(hw) for hw in packed.grid)
            return tokens, sincos_2d(rows, cols, extent, c.enc_dim, weight.dtype)
        if any(hw != (c.grid_size, c.grid_size) for hw in packed.grid):
            raise ValueError(f"a learned position table covers only {c.grid_size}x{c.grid_size} grids, got "
                             f"{sorted(set(packed.grid))}; images of other sizes need AIMv2Config(native=True)")
        return tokens, self.pos_embed[0].repeat(packed.num_images, 1)

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> patch tokens (B, N, D): conv, RMSNorm, plus the position embedding."""
        tokens, positions = self.embed_parts(images)
        return tokens + positions

    def forward(self, images: Tensor | PackedImages, prefix_len=None) -> Tensor:
        """Features (B, N, D), or (T, D) for packed images. prefix_len None: bidirectional attention
        (inference); an int or an int tensor (B,) or (n,): key j visible to query i iff j <= i or
        j < prefix_len[b] (pre-training), positions counted within each image."""
        if isinstance(images, PackedImages):
            tokens, positions = self.embed_packed(images)
            return run_blocks(self.blocks, self.norm, positions, prefix_len, causal=prefix_len is not None,
                              update=tokens, packing=(images.cu_seqlens, images.max_seqlen))
        tokens, positions = self.embed_parts(images)
        # The positions start the residual stream and the tokens are its first update, added by the
        # first block's fused norm: under autocast a bf16 update into a float32 stream, no extra pass.
        return run_blocks(self.blocks, self.norm, positions, prefix_len, causal=prefix_len is not None,
                          update=tokens)

    def features(self, images: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor] | tuple[list[Tensor], Tensor]:
        """Bidirectional features for downstream use.

        images (B, C, H, W) -> (patch features (B, N, D), their mean (B, D)).
        A list of n images (C, H_i, W_i) of different sizes (native encoders; sides multiples of the
        patch size) -> ([patch features (N_i, D) per image], their means (n, D)), from one packed
        forward pass."""
        if isinstance(images, Tensor):
            patch_features = self.forward(images)
            return patch_features, patch_features.mean(dim=1)
        if not self.config.native and not all(tuple(i.shape[1:]) == (self.config.image_size,) * 2 for i in images):
            self._check_images(images)  # raises, naming the native option
        packed = PackedImages.from_images(images, self.config.patch_size).to(self.patch_embed.weight.device)
        per_image = packed.split(self.forward(packed))  # [(N_i, D)]
        return per_image, torch.stack([f.mean(dim=0) for f in per_image])

    @classmethod
    def from_transformers(cls, hf_vision_model) -> "AIMv2Encoder":
        """An encoder holding the weights of a transformers `Aimv2VisionModel` (learned-position or
        native-resolution variant), on its device and in its dtype. Built on the meta device and then given copies of the weights, so
        no memory is spent on an initialization that would be overwritten."""
        config = config_from_transformers(hf_vision_model.config)
        hf_state = {k: v.detach() for k, v in hf_vision_model.state_dict().items()}
        ours = {k: v.clone() for k, v in state_dict_from_transformers(hf_state, config.enc_depth, config.native).items()}
        with torch.device("meta"):
            encoder = cls(config)
        encoder.load_state_dict(ours, strict=True, assign=True)  # own storage: no aliasing of the source
        return encoder

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, cache_dir=None, revision=None) -> "AIMv2Encoder":
        """An encoder (in eval mode) from a model folder, without transformers.

        path: a folder written by `aimv2-export`, by transformers' `save_pretrained` (`Aimv2VisionModel`,
        or a full `Aimv2Model`: only its "vision_model." weights are read), or a released AIMv2
        checkpoint on disk (config.json plus model.safetensors, sharded model.safetensors.index.json,
        or pytorch_model.bin); or a hub repo id such as "apple/aimv2-large-patch14-224", found in the
        local hub cache only (`cache_dir`, `revision` as in huggingface_hub): nothing is downloaded.
        The attention-pooling head ("head.*") is dropped; every other weight must match the encoder
        (strict). dtype None keeps the stored dtype. Unsupported variants (attention or MLP biases,
        activations other than SiLU) raise ValueError; a missing folder, config.json, weights file or
        uncached repo raises FileNotFoundError. Built on the meta device, so no init is wasted."""

        config, state = read_pretrained(path, device=device, dtype=dtype, cache_dir=cache_dir, revision=revision)
        with torch.device("meta"):
            encoder = cls(config)
        try:
            encoder.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:  # shapes that do not fit config.json
            raise ValueError(f"the weights of {path!r} do not fit its config.json: {exc}") from exc
        return encoder.eval()

    def to_transformers_state_dict(self) -> dict[str, Tensor]:
        """This encoder's weights under `Aimv2VisionModel` keys (without the pooling head); tensors
        share storage with the parameters, as `state_dict()` does."""
        return state_dict_to_transformers(self.state_dict(), self.config.enc_depth, self.config.native)
