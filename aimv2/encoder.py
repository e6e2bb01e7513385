"""The AIMv2 vision encoder: patch conv, patch RMSNorm, learned positions, prefix-attention blocks."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import aimv2_kernels as ak

from .blocks import init_weights, make_blocks, run_blocks
from .config import AIMv2Config
from .interop import config_from_transformers, state_dict_from_transformers, state_dict_to_transformers


class AIMv2Encoder(nn.Module):
    """images (B, C, H, W) -> features (B, N, enc_dim).

    State-dict keys: patch_embed.{weight,bias}, patch_norm.weight, pos_embed (1, N, D),
    blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2,mlp.fc3}.weight, norm.weight.
    """

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.channels, c.enc_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_norm = ak.nn.RMSNorm(c.enc_dim, eps=c.norm_eps)
        self.pos_embed = nn.Parameter(torch.empty(1, c.num_patches, c.enc_dim))
        self.blocks = make_blocks(c.enc_dim, c.enc_depth, c.enc_heads, c.enc_hidden, c.norm_eps)
        self.norm = ak.nn.RMSNorm(c.enc_dim, eps=c.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape (B, {c.channels}, {c.image_size}, {c.image_size}), got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalized pixels), got {images.dtype}")

    def embed_parts(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> (patch tokens (B, N, D): conv then RMSNorm, positions: the position
        embedding broadcast to (B, N, D), a view). Their sum is the blocks' input."""
        self._check_images(images)
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        tokens = self.patch_norm(x.flatten(2).transpose(1, 2))  # (B, N, D), row-major patch order
        return tokens, self.pos_embed.expand(tokens.shape[0], -1, -1)

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> patch tokens (B, N, D): conv, RMSNorm, plus the position embedding."""
        tokens, positions = self.embed_parts(images)
        return tokens + positions

    def forward(self, images: Tensor, prefix_len=None) -> Tensor:
        """Features (B, N, D). prefix_len None: bidirectional attention (inference); an int or an int
        tensor (B,): key j visible to query i iff j <= i or j < prefix_len[b] (pre-training)."""
        tokens, positions = self.embed_parts(images)
        # The positions start the residual stream and the tokens are its first update, added by the
        # first block's fused norm: under autocast a bf16 update into a float32 stream, no extra pass.
        return run_blocks(self.blocks, self.norm, positions, prefix_len, causal=prefix_len is not None,
                          update=tokens)

    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Bidirectional features for downstream use: (patch features (B, N, D), their mean (B, D))."""
        patch_features = self.forward(images)
        return patch_features, patch_features.mean(dim=1)

    @classmethod
    def from_transformers(cls, hf_vision_model) -> "AIMv2Encoder":
        """An encoder holding the weights of a transformers `Aimv2VisionModel` (non-native variant), on
        its device and in its dtype. Built on the meta device and then given copies of the weights, so
        no memory is spent on an initialization that would be overwritten."""
        config = config_from_transformers(hf_vision_model.config)
        hf_state = {k: v.detach() for k, v in hf_vision_model.state_dict().items()}
        ours = {k: v.clone() for k, v in state_dict_from_transformers(hf_state, config.enc_depth).items()}
        with torch.device("meta"):
            encoder = cls(config)
        encoder.load_state_dict(ours, strict=True, assign=True)  # own storage: no aliasing of the source
        return encoder

    def to_transformers_state_dict(self) -> dict[str, Tensor]:
        """This encoder's weights under `Aimv2VisionModel` keys (without the pooling head); tensors
        share storage with the parameters, as `state_dict()` does."""
        return state_dict_to_transformers(self.state_dict(), self.config.enc_depth)
