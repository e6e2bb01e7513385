"""AIMv2Config: one dataclass describing encoder, decoder, text and loss, plus the named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aimv2_kernels.validation import SUPPORTED_HEAD_DIMS


def swiglu_hidden(dim: int, multiple: int = 256) -> int:
    """The released SwiGLU width: int(2 * 4 * dim / 3) rounded up to a multiple of `multiple`."""
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // multiple) * multiple


@dataclass(frozen=True)
class AIMv2Config:
    # ---- image and patches ----
    image_size: int = 224  # square input side in pixels
    patch_size: int = 14  # square patch side; the patch conv uses kernel = stride = patch_size
    channels: int = 3  # image channels
    # native resolution: 2-D sinusoidal positions (no learned table), so images of any grid of patches
    # are accepted, alone or packed; image_size is then only the default square size
    native: bool = False
    # ---- vision encoder (the trunk kept after pre-training); defaults: AIMv2-L ----
    enc_dim: int = 1024  # width D
    enc_depth: int = 24  # number of pre-norm blocks
    enc_heads: int = 8  # attention heads; enc_dim // enc_heads must be a supported head dim
    enc_hidden: int = 2816  # SwiGLU hidden width
    # ---- multimodal decoder (shared by every released size) ----
    dec_dim: int = 1024
    dec_depth: int = 12
    dec_heads: int = 8
    dec_hidden: int = 2816
    # ---- text ----
    vocab_size: int = 32000  # token ids are 0 .. vocab_size - 1
    max_text_len: int = 77  # T: caption tokens per sample (the decoder's text positions are T + 1 with BOS)
    pad_id: int = 0  # padding id; labels equal to it are ignored by the loss
    # ---- loss ----
    alpha: float = 0.4  # total = alpha * pixel + text
    norm_eps: float = 1e-5  # RMSNorm epsilon everywhere
    norm_pix_eps: float = 1e-6  # epsilon of the per-patch target normalization
    # ---- prefix attention ----
    eval_prefix_len: int | None = None  # prefix used in eval mode when forward gets none; None -> num_patches // 2

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "enc_dim", "enc_depth", "enc_heads", "enc_hidden",
                     "dec_dim", "dec_depth", "dec_heads", "dec_hidden", "vocab_size", "max_text_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.num_patches < 2:
            raise ValueError(f"the image must have at least 2 patches to predict one from another, got {self.num_patches}")
        for prefix in ("enc", "dec"):
            dim, heads = getattr(self, f"{prefix}_dim"), getattr(self, f"{prefix}_heads")
            if dim % heads or dim // heads not in SUPPORTED_HEAD_DIMS:
                raise ValueError(f"{prefix}_dim / {prefix}_heads = {dim} / {heads} must be one of the supported head "
                                 f"dims {SUPPORTED_HEAD_DIMS}")
        if not isinstance(self.native, bool):
            raise TypeError(f"native must be a bool, got {self.native!r}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_id}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not (self.norm_eps > 0 and self.norm_pix_eps > 0):
            raise ValueError(f"norm_eps and norm_pix_eps must be > 0, got {self.norm_eps} and {self.norm_pix_eps}")
        if self.eval_prefix_len is not None and not 0 <= self.eval_prefix_len <= self.num_patches:
            raise ValueError(f"eval_prefix_len must be None or in [0, {self.num_patches}], got {self.eval_prefix_len}")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N: image tokens per image."""
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch, p * p * c: the pixel head's output width."""
        return self.patch_size * self.patch_size * self.channels

    @property
    def ignore_index(self) -> int:
        """The label the loss ignores: the padding id."""
        return self.pad_id

    @classmethod
    def preset(cls, name: str, **overrides) -> "AIMv2Config":
        """A named configuration ("tiny", "large", "huge", "1b", "3b") with optional field overrides;
        `native=True` makes any of them native-resolution."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown AIMv2Config field(s) {sorted(unknown)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _released(dim: int, heads: int) -> AIMv2Config:
    """A released encoder size at 224 px / patch 14 / depth 24 with the shared decoder and 32k vocab."""
    return AIMv2Config(enc_dim=dim, enc_depth=24, enc_heads=heads, enc_hidden=swiglu_hidden(dim))


PRESETS: dict[str, AIMv2Config] = {
    # ~0.35M parameters: 32 px images in 4 px patches (64 patches), byte-level vocabulary (256 bytes
    # plus 3 special ids, pad = 0), 24-token captions. Trains on a 2-core CPU in minutes.
    "tiny": AIMv2Config(
        image_size=32, patch_size=4,
        enc_dim=64, enc_depth=4, enc_heads=2, enc_hidden=176,
        dec_dim=64, dec_depth=2, dec_heads=2, dec_hidden=176,
        vocab_size=259, max_text_len=24,
    ),
    "large": _released(1024, 8),  # encoder ~0.31B parameters
    "huge": _released(1536, 12),  # ~0.68B
    "1b": _released(2048, 16),  # ~1.23B
    "3b": _released(3072, 24),  # ~2.72B
}
