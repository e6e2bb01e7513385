"""Conversion between `AIMv2Encoder` and transformers' `Aimv2VisionModel` (learned-position and
native-resolution variants).

A layer below the encoder: configs and state dicts only, so `AIMv2Encoder.from_transformers` and
`to_transformers_state_dict` import it and it imports nothing of the model.

Released AIMv2 checkpoints load into `Aimv2VisionModel`; this maps its weights onto ours and back.
Key map (ours <- theirs), per block i; our attention projects q, k, v with one fused matrix, theirs
with three, so qkv is their q, k and v stacked along the output dim:

    patch_embed.{weight,bias}     <- embeddings.patch_embed.{weight,bias}
    patch_norm.weight             <- embeddings.rms_norm.weight
    pos_embed (1, N, D)           <- embeddings.position_embedding.weight (N, D)   (not when is_native:
                                     both sides compute the same 2-D sin-cos embedding)
    blocks.i.norm1.weight         <- encoder.layers.i.rms_norm1.weight
    blocks.i.attn.qkv.weight      <- cat(encoder.layers.i.attention.{q,k,v}_proj.weight)
    blocks.i.attn.proj.weight     <- encoder.layers.i.attention.out_proj.weight
    blocks.i.norm2.weight         <- encoder.layers.i.rms_norm2.weight
    blocks.i.mlp.fc1/fc3/fc2      <- encoder.layers.i.ffn.gate_proj/up_proj/down_proj
    norm.weight                   <- rms_norm.weight

The attention-pooling head (`head.*`, present when use_head=True) is not part of the trunk and is not
converted. Variants we do not implement (biases in attention or MLP, another activation) are refused
with a ValueError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch import nn

from .config import AIMv2Config

_MLP_NAMES = (("fc1", "gate_proj"), ("fc3", "up_proj"), ("fc2", "down_proj"))
_POS_KEY = "embeddings.position_embedding.weight"


def _side(value, name: str) -> int:
    """A square size from an int or an (h, w) pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"only square {name} is supported, got {value!r}")
        value = value[0]
    return int(value)


def config_from_transformers(hf_config, **overrides) -> AIMv2Config:
    """An AIMv2Config whose encoder matches an `Aimv2VisionConfig` (decoder fields keep their defaults)."""
    unsupported = {
        "qkv_bias": getattr(hf_config, "qkv_bias", False),
        "mlp_bias": getattr(hf_config, "mlp_bias", False),
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"Aimv2VisionConfig.{name}=True is not supported by AIMv2Encoder")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"Aimv2VisionConfig.hidden_act must be 'silu' (SwiGLU), got {hf_config.hidden_act!r}")
    fields = dict(
        image_size=_side(hf_config.image_size, "image_size"), patch_size=_side(hf_config.patch_size, "patch_size"),
        channels=hf_config.num_channels, enc_dim=hf_config.hidden_size, enc_depth=hf_config.num_hidden_layers,
        enc_heads=hf_config.num_attention_heads, enc_hidden=hf_config.intermediate_size, norm_eps=hf_config.rms_norm_eps,
        native=bool(getattr(hf_config, "is_native", False)),
    )
    fields.update(overrides)
    return AIMv2Config(**fields)


def transformers_config_kwargs(config: AIMv2Config) -> dict:
    """Keyword arguments for an `Aimv2VisionConfig` with this encoder's shape (no pooling head)."""
    c = config
    return dict(hidden_size=c.enc_dim, intermediate_size=c.enc_hidden, num_hidden_layers=c.enc_depth,
                num_attention_heads=c.enc_heads, num_channels=c.channels, image_size=c.image_size,
                patch_size=c.patch_size, rms_norm_eps=c.norm_eps, qkv_bias=False, mlp_bias=False,
                hidden_act="silu", is_native=c.native, use_head=False)


def _renamed_keys(depth: int) -> list[tuple[str, str]]:
    """(our key, their key) for every tensor that maps one to one, unchanged."""
    pairs = [("patch_embed.weight", "embeddings.patch_embed.weight"), ("patch_embed.bias", "embeddings.patch_embed.bias"),
             ("patch_norm.weight", "embeddings.rms_norm.weight"), ("norm.weight", "rms_norm.weight")]
    for i in range(depth):
        mine, layer = f"blocks.{i}.", f"encoder.layers.{i}."
        pairs += [(mine + "norm1.weight", layer + "rms_norm1.weight"), (mine + "norm2.weight", layer + "rms_norm2.weight"),
                  (mine + "attn.proj.weight", layer + "attention.out_proj.weight")]
        pairs += [(f"{mine}mlp.{ours}.weight", f"{layer}ffn.{theirs}.weight") for ours, theirs in _MLP_NAMES]
    return pairs


def _qkv_keys(depth: int) -> list[tuple[str, list[str]]]:
    """(our fused qkv key, their q, k, v keys) per block."""
    return [(f"blocks.{i}.attn.qkv.weight", [f"encoder.layers.{i}.attention.{n}_proj.weight" for n in "qkv"])
            for i in range(depth)]


def transformers_keys(depth: int, native: bool = False) -> set[str]:
    """Every key of an `Aimv2VisionModel` state dict without the pooling head (and, for native
    models, without a position table)."""
    keys = {theirs for _, theirs in _renamed_keys(depth)}
    keys |= {key for _, parts in _qkv_keys(depth) for key in parts}
    return keys if native else keys | {_POS_KEY}


def state_dict_from_transformers(hf_state: dict[str, Tensor], depth: int, native: bool = False) -> dict[str, Tensor]:
    """Our encoder's state dict from an `Aimv2VisionModel` state dict."""
    ours = {mine: hf_state[theirs] for mine, theirs in _renamed_keys(depth)}
    if not native:
        ours["pos_embed"] = hf_state[_POS_KEY].unsqueeze(0)  # (N, D) -> (1, N, D)
    for fused, parts in _qkv_keys(depth):
        ours[fused] = torch.cat([hf_state[k] for k in parts], dim=0)  # (3D, D)
    return ours


def state_dict_to_transformers(state: dict[str, Tensor], depth: int, native: bool = False) -> dict[str, Tensor]:
    """An `Aimv2VisionModel` state dict (no pooling head) from our encoder's state dict."""
    theirs = {their_key: state[mine] for mine, their_key in _renamed_keys(depth)}
    if not native:
        theirs[_POS_KEY] = state["pos_embed"].squeeze(0)
    for fused, parts in _qkv_keys(depth):
        theirs.update(zip(parts, state[fused].chunk(3, dim=0)))
    return theirs


def to_transformers(encoder: nn.Module):
    """A transformers `Aimv2VisionModel` (no pooling head) holding a copy of an `AIMv2Encoder`'s weights."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    param = next(encoder.parameters())
    model = Aimv2VisionModel(Aimv2VisionConfig(**transformers_config_kwargs(encoder.config)))
    model.load_state_dict(encoder.to_transformers_state_dict(), strict=True)
    return model.to(device=param.device, dtype=param.dtype)
