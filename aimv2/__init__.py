"""AIMv2 built on aimv2_kernels: vision encoder, multimodal decoder, and the pre-training model.

    from aimv2 import AIMv2Config, AIMv2Model
    model = AIMv2Model(AIMv2Config.preset("tiny"))
    loss = model(images, tokens)          # ak.AIMv2Loss(total, pixel, text)
    loss.total.backward()
    feats, pooled = model.encoder.features(images)

    native = AIMv2Model(AIMv2Config.preset("tiny", native=True))
    loss = native(PackedImages.from_images(list_of_images, 4), tokens)   # images at their own sizes
"""
from .config import PRESETS, AIMv2Config
from .decoder import AIMv2Decoder
from .encoder import AIMv2Encoder
from .model import AIMv2Model
from .packing import PackedImages

__all__ = ["AIMv2Config", "AIMv2Decoder", "AIMv2Encoder", "AIMv2Model", "PRESETS", "PackedImages"]
