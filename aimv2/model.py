"""AIMv2Model: encoder + decoder + the fused AIMv2 loss, for pre-training."""
from __future__ import annotations

import torch
from torch import Tensor, nn

import aimv2_kernels as ak

from .config import AIMv2Config
from .decoder import AIMv2Decoder
from .encoder import AIMv2Encoder
from .packing import PackedImages
from .patchify import patchify, resolve_packed_prefix_len, resolve_prefix_len, target_mask


def autocast_operands(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Cast the text head's operands as autocast would cast a Linear; the loss op itself is not
    autocast-aware and needs one dtype (it accumulates in fp32 regardless)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


class AIMv2Model(nn.Module):
    """forward(images (B, C, H, W) normalized, tokens (B, T) int with pad_id padding, prefix_len)
    -> ak.AIMv2Loss(total, pixel, text).

    prefix_len: an int tensor (B,) or an int; None samples uniform in 1..N-1 per sample in training
    mode (torch's global RNG on the images' device) and uses config.eval_prefix_len (default N // 2)
    in eval mode, so validation losses are deterministic.

    images may also be `PackedImages` (n images of their own sizes, tokens (n, T), prefix_len (n,)
    with N_i per image; native configs): the encoder and decoder run packed, the pixel objective is
    shifted inside each image, and the loss is the padded definition (a mean over all counted
    patches and tokens of the batch), so equal images give equal losses either way.
    """

    def __init__(self, config: AIMv2Config):
        super().__init__()
        self.config = config
        self.encoder = AIMv2Encoder(config)
        self.decoder = AIMv2Decoder(config)

    def forward(self, images: Tensor | PackedImages, tokens: Tensor, prefix_len=None) -> ak.AIMv2Loss:
        if isinstance(images, PackedImages):
            return self._forward_packed(images, tokens, prefix_len)
        c = self.config
        # a native encoder takes any grid; the encoder itself rejects images it cannot take
        N = (images.shape[-2] // c.patch_size) * (images.shape[-1] // c.patch_size) if c.native and images.dim() == 4 else c.num_patches
        prefix = resolve_prefix_len(prefix_len, images.shape[0], N, training=self.training,
                                    eval_default=c.eval_prefix_len, device=images.device)
        features = self.encoder(images, prefix)  # (B, N, enc_dim)
        pixel_pred, text_hidden = self.decoder(features, tokens)  # (B, N - 1, P), (B, T, dec_dim)
        targets = patchify(images, c.patch_size)[:, 1:].contiguous()  # (B, N - 1, P): patches 1..N-1
        text_hidden, text_weight = autocast_operands(text_hidden, self.decoder.text_head.weight)
        return ak.aimv2_loss(pixel_pred, targets, target_mask(prefix, N), text_hidden, text_weight, tokens,
                             alpha=c.alpha, ignore_index=c.ignore_index, eps=c.norm_pix_eps)

    def _forward_packed(self, packed: PackedImages, tokens: Tensor, prefix_len) -> ak.AIMv2Loss:
        c = self.config
        prefix = resolve_packed_prefix_len(prefix_len, packed.lengths, training=self.training,
                                           eval_default=c.eval_prefix_len, device=packed.patches.device)
        features = self.encoder(packed, prefix)  # (T, enc_dim)
        pixel_pred, text_hidden = self.decoder.forward_packed(features, packed.lengths, tokens)  # (T - n, P), (n, L, d)
        targets = packed.patches[packed.target_rows()]  # (T - n, P): patches 1..N_i-1 of each image
        text_hidden, text_weight = autocast_operands(text_hidden, self.decoder.text_head.weight)
        return ak.aimv2_loss(pixel_pred.unsqueeze(0), targets.unsqueeze(0), packed.target_mask(prefix).unsqueeze(0),
                             text_hidden, text_weight, tokens, alpha=c.alpha, ignore_index=c.ignore_index,
                             eps=c.norm_pix_eps)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters AdamW should not decay: biases and norm weights (every 1-D
        parameter), the position embeddings and the BOS vector."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or name.endswith(("pos_embed", "bos"))}
