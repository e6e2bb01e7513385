"""Reading encoder weights from a model folder: ours (aimv2-export), one transformers wrote, or a
released AIMv2 checkpoint (a local folder or a repo id found in the local Hugging Face hub cache,
never downloaded). `AIMv2Encoder.from_pretrained` builds the encoder from what this returns; the
export (export.py) writes the same layout.
"""
from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import AIMv2Config
from .interop import config_from_transformers, state_dict_from_transformers, transformers_keys

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# weight files looked for in a model folder, in this order
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

VISION_MODEL_TYPE = "aimv2_vision_model"
FULL_MODEL_TYPE = "aimv2"
# Aimv2VisionConfig's defaults (transformers 5.x), for config.json files that leave keys out
VISION_CONFIG_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, num_channels=3,
    image_size=224, patch_size=14, hidden_act="silu", attention_dropout=0.0, rms_norm_eps=1e-5, qkv_bias=False,
    mlp_bias=False, initializer_range=0.02, use_head=True, is_native=False,
)
# keys of a vision-model state dict that are not ours: the attention-pooling head and, in files
# written by old transformers versions, the position-id buffer
_DROPPED = re.compile(r"^(head\.|embeddings\.position_ids$)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")



def resolve_dtype(dtype, any_float: bool = False) -> torch.dtype | None:
    """None, a name in DTYPES or a torch dtype among them (any floating dtype when any_float)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and (dtype in DTYPES.values() or any_float and dtype.is_floating_point):
        return dtype
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or None: the stored dtype), got {dtype!r}")


# ---- reading a model folder (ours, transformers', released checkpoints) ------------------------------

def _resolve_folder(path: str, cache_dir=None, revision: str | None = None) -> str:
    """A local model folder: `path` itself, or the snapshot of repo id `path` in the local hub cache."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            hint = " (a training checkpoint: turn it into a model folder with `aimv2-export`)" if path.endswith(".pt") else ""
            raise FileNotFoundError(f"{path!r} is not a directory{hint}; expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
        return path
    if not _REPO_ID.match(path) or path.startswith((".", "~")):
        raise FileNotFoundError(f"no such directory: {path!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path!r} is not a local directory, and huggingface_hub, needed to look the repo "
                                "up in the local hub cache, is not installed") from None
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, or a revision/cache problem: the repo is not usable offline
        from huggingface_hub import constants

        where = os.fspath(cache_dir or constants.HF_HUB_CACHE)  # HF_HUB_CACHE / HF_HOME already applied
        raise FileNotFoundError(
            f"{path!r} is neither a local directory nor a repo in the local Hugging Face hub cache ({where}); "
            f"nothing is downloaded here: fetch it first with `hf download {path}` (older huggingface_hub: "
            f"`huggingface-cli download {path}`) or `huggingface_hub.snapshot_download({path!r})`, or pass the path "
            f"of a folder with {CONFIG_NAME} and {WEIGHTS_NAME} ({type(exc).__name__})") from exc


def _vision_config(raw: dict, source: str) -> tuple[SimpleNamespace, str]:
    """(the vision config with transformers' defaults filled in, the weights' key prefix)."""
    model_type = raw.get("model_type")
    if model_type == VISION_MODEL_TYPE:
        fields, prefix = raw, ""
    elif model_type == FULL_MODEL_TYPE and isinstance(raw.get("vision_config"), dict):
        fields, prefix = raw["vision_config"], "vision_model."
    elif model_type == FULL_MODEL_TYPE:
        raise ValueError(f"{source} has model_type 'aimv2' but no vision_config: the original remote-code AIMv2 "
                         "format, which is not supported; use a revision in the transformers format (model_type "
                         f"'{VISION_MODEL_TYPE}', or 'aimv2' with a vision_config)")
    else:
        raise ValueError(f"{source} is not an AIMv2 vision config: model_type {model_type!r}, expected "
                         f"'{VISION_MODEL_TYPE}' or '{FULL_MODEL_TYPE}' with a vision_config")
    return SimpleNamespace(**{**VISION_CONFIG_DEFAULTS, **fields}), prefix


def _load_weights(folder: str, wanted) -> dict[str, Tensor]:
    """The tensors of the folder's weight file(s) whose key passes `wanted(key)`, on the CPU."""
    found = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise FileNotFoundError(f"no weights file in {folder!r}: expected one of {list(WEIGHT_FILES)}")
    name = found[0]
    if name.endswith(".index.json"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map") or {}
        shards = sorted({shard for key, shard in weight_map.items() if wanted(key)})
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise FileNotFoundError(f"{folder!r}: shard(s) {missing} named in {name} are missing")
        files = [os.path.join(folder, s) for s in shards]
    else:
        files = [os.path.join(folder, name)]
    state: dict[str, Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                state.update({key: f.get_tensor(key) for key in f.keys() if wanted(key)})
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"{file!r} does not hold a state dict")
            state.update({key: value for key, value in loaded.items() if wanted(key)})
    return state


def read_pretrained(path, *, device=None, dtype=None, cache_dir=None,
                    revision: str | None = None) -> tuple[AIMv2Config, dict[str, Tensor]]:
    """(config, our encoder's state dict) from a model folder or a repo id in the local hub cache.

    The folder holds config.json, an `Aimv2VisionConfig` or a full `Aimv2Config` with a vision_config
    (then only the "vision_model." weights are read: text model and projections are ignored), and
    model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin(.index.json). The
    pooling head ("head.*") is dropped; every other key must be one of the encoder's. Tensors are
    cast to `dtype` (None: the dtype of the stored patch-embedding weight) and moved to `device`.
    """
    target = resolve_dtype(dtype, any_float=True)
    path = os.path.expanduser(os.fspath(path))
    folder = _resolve_folder(path, cache_dir, revision)
    if ckpt.list_checkpoints(folder) and not any(os.path.isfile(os.path.join(folder, n)) for n in WEIGHT_FILES):
        raise FileNotFoundError(f"{folder!r} is a training run directory, not a model folder; export its encoder "
                                f"first: aimv2-export {folder} OUTDIR")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder!r}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path!r} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path!r} does not hold a JSON object")
    vision, prefix = _vision_config(raw, config_path)
    config = config_from_transformers(vision)  # refuses biases, other activations, non-square sizes

    def wanted(key: str) -> bool:
        return key.startswith(prefix) and not _DROPPED.match(key[len(prefix):])

    theirs = {key[len(prefix):]: value for key, value in _load_weights(folder, wanted).items()}
    expected = transformers_keys(config.enc_depth, config.native)
    missing, unexpected = sorted(expected - theirs.keys()), sorted(theirs.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"the weights in {folder!r} do not match its {CONFIG_NAME}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    target = target or theirs["embeddings.patch_embed.weight"].dtype
    theirs = {k: v.to(device=device, dtype=target) for k, v in theirs.items()}
    return config, state_dict_from_transformers(theirs, config.enc_depth, config.native)
