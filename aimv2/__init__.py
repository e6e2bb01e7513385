"""AIMv2 built on aimv2_kernels: vision encoder, multimodal decoder, and the pre-training model.

    from aimv2 import AIMv2Config, AIMv2Model
    model = AIMv2Model(AIMv2Config.preset("tiny"))
    loss = model(images, tokens)          # ak.AIMv2Loss(total, pixel, text)
    loss.total.backward()
    feats, pooled = model.encoder.features(images)
"""
from .config import PRESETS, AIMv2Config
from .decoder import AIMv2Decoder
from .encoder import AIMv2Encoder
from .model import AIMv2Model

__all__ = ["AIMv2Config", "AIMv2Decoder", "AIMv2Encoder", "AIMv2Model", "PRESETS"]
