"""aimv2-export: a training checkpoint -> a folder that transformers and this package load.

    aimv2-export runs/aimv2-tiny export/                    # newest checkpoint of a run
    aimv2-export runs/aimv2-tiny/checkpoints/step_00001000.pt export/ --dtype bfloat16
    aimv2-export export/ export-bf16/ --dtype bfloat16       # re-export an exported folder

The folder holds two files, the layout of `Aimv2VisionModel.save_pretrained`:

* config.json: an `Aimv2VisionConfig` (model_type "aimv2_vision_model", architectures
  ["Aimv2VisionModel"], use_head false, is_native for native-resolution encoders), written here
  without transformers;
* model.safetensors: the encoder only (no decoder), under `Aimv2VisionModel` key names, every tensor
  contiguous with its own storage, in the checkpoint's dtype or `--dtype`; metadata {"format": "pt"}.

Both are written into a temporary sibling directory, fsync'ed, and the directory is renamed into
place, so a crash never leaves a half-written export under OUTDIR.

The other direction, `read_pretrained`, reads such a folder, one written by transformers, or a
released AIMv2 checkpoint (a local folder or a repo id found in the local Hugging Face hub cache,
never downloaded); `AIMv2Encoder.from_pretrained` builds the encoder from it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
from types import SimpleNamespace

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .config import AIMv2Config
from .encoder import AIMv2Encoder
from .interop import config_from_transformers, state_dict_from_transformers, transformers_config_kwargs

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


# ---- config.json ------------------------------------------------------------------------------------

def transformers_config_dict(config: AIMv2Config, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of an `Aimv2VisionModel` (no pooling head) with this encoder's shape: the keys
    `Aimv2VisionConfig(**transformers_config_kwargs(config)).save_pretrained` writes, without
    transformers_version, so transformers is not needed to write it."""
    fields = dict(VISION_CONFIG_DEFAULTS)
    fields.update(transformers_config_kwargs(config))
    fields.update(model_type=VISION_MODEL_TYPE, architectures=["Aimv2VisionModel"], dtype=_dtype_name(dtype))
    return dict(sorted(fields.items()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve_dtype(dtype, any_float: bool = False) -> torch.dtype | None:
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
    target = _resolve_dtype(dtype, any_float=True)
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
    expected = _expected_keys(config)
    missing, unexpected = sorted(expected - theirs.keys()), sorted(theirs.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"the weights in {folder!r} do not match its {CONFIG_NAME}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    target = target or theirs["embeddings.patch_embed.weight"].dtype
    theirs = {k: v.to(device=device, dtype=target) for k, v in theirs.items()}
    return config, state_dict_from_transformers(theirs, config.enc_depth, config.native)


def _expected_keys(config: AIMv2Config) -> set[str]:
    with torch.device("meta"):
        return set(AIMv2Encoder(config).to_transformers_state_dict())


# ---- export -----------------------------------------------------------------------------------------

def _encoder_from_checkpoint(path: str) -> tuple[AIMv2Config, dict[str, Tensor], str]:
    """(config, encoder state dict, description) of a training checkpoint; CheckpointError if unusable."""
    state = ckpt.load_checkpoint(path)
    try:
        config = AIMv2Config(**state["model_config"])
    except (TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {path!r} has an unusable model_config ({exc})") from exc
    model = state["model"]
    if not isinstance(model, dict):
        raise ckpt.CheckpointError(f"checkpoint {path!r}: its 'model' is not a state dict")
    encoder_state = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    if not encoder_state:
        raise ckpt.CheckpointError(f"checkpoint {path!r} holds no encoder weights (no 'encoder.*' keys in its model)")
    with torch.device("meta"):
        encoder = AIMv2Encoder(config)
    try:  # every key and shape checked against the config
        encoder.load_state_dict(encoder_state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"checkpoint {path!r}: its encoder weights do not match its model_config: {exc}") from exc
    return config, encoder.state_dict(), f"{path} (step {state['step']})"


def _load_source(source: str) -> tuple[AIMv2Config, dict[str, Tensor], str]:
    """A training checkpoint file, a run directory (its newest checkpoint) or an exported folder."""
    if os.path.isdir(source):
        path = ckpt.latest_checkpoint(source)  # a run directory (its config.json is the run's, not a model's)
        if path is not None:
            return _encoder_from_checkpoint(path)
        if any(os.path.isfile(os.path.join(source, name)) for name in WEIGHT_FILES):
            config, state = read_pretrained(source)
            return config, state, f"the encoder in {source}"
        raise ckpt.CheckpointError(f"no checkpoint in {source!r}: neither {ckpt.checkpoint_dir(source)}/step_*.pt "
                                   f"nor an exported encoder ({CONFIG_NAME} and {WEIGHTS_NAME})")
    return _encoder_from_checkpoint(source)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"output {out_dir!r} exists and is not a directory")
    entries = os.listdir(out_dir)
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out_dir!r} is not empty; pass --overwrite (overwrite=True) to replace it")
    if CONFIG_NAME not in entries or any(os.path.isdir(os.path.join(out_dir, e)) for e in entries):
        raise FileExistsError(f"refusing to overwrite {out_dir!r}: it does not look like a model export "
                              f"(no {CONFIG_NAME}, or it holds sub-directories); remove it yourself if that is meant")


def export_encoder(checkpoint, out_dir, dtype=None, *, overwrite: bool = False) -> str:
    """Write the encoder of a training checkpoint as a transformers `Aimv2VisionModel` folder.

    checkpoint: a checkpoint file, a run directory (its newest checkpoint) or an exported folder.
    out_dir: created with config.json and model.safetensors (see the module docstring); it must not
    exist or be empty, unless overwrite=True and it holds an earlier export (files only, with a
    config.json). dtype: "float32", "bfloat16", "float16" or a torch dtype; None keeps the stored one.
    Returns out_dir as an absolute path. Raises CheckpointError for a missing, corrupt or unusable
    checkpoint and FileExistsError for an occupied out_dir.
    """
    return _export(checkpoint, out_dir, dtype, overwrite)[0]


def _export(checkpoint, out_dir, dtype, overwrite: bool) -> tuple[str, AIMv2Config, torch.dtype, str]:
    """export_encoder, returning (out_dir, config, dtype written, description of the source)."""
    target = _resolve_dtype(dtype)
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    _check_out_dir(out_dir, overwrite)  # before the (possibly long) load
    config, state, description = _load_source(os.path.expanduser(os.fspath(checkpoint)))
    with torch.device("meta"):
        encoder = AIMv2Encoder(config)
    encoder.load_state_dict(state, strict=True, assign=True)
    target = target or encoder.patch_embed.weight.dtype
    # own storage for every tensor: safetensors refuses the q/k/v views of our fused qkv
    tensors = {key: torch.empty(value.shape, dtype=target).copy_(value)
               for key, value in encoder.to_transformers_state_dict().items()}
    _write_folder(out_dir, transformers_config_dict(config, target), tensors, overwrite)
    return out_dir, config, target, description


def _write_folder(out_dir: str, config: dict, tensors: dict[str, Tensor], overwrite: bool) -> None:
    """Write into a temporary sibling directory, then rename it to out_dir."""
    from safetensors.torch import save_file

    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{base}.tmp-{tag}")
    os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        weights = os.path.join(tmp, WEIGHTS_NAME)
        save_file(tensors, weights, metadata={"format": "pt"})
        ckpt.fsync_path(weights)
        ckpt.fsync_path(tmp)
        _check_out_dir(out_dir, overwrite)  # again: something may have appeared meanwhile
        if os.path.isdir(out_dir) and os.listdir(out_dir):  # overwrite: move the old export aside first
            old = os.path.join(parent, f".{base}.old-{tag}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt.fsync_path(parent)


# ---- command line -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aimv2-export",
        description="Export the encoder of a training checkpoint as a transformers Aimv2VisionModel folder "
                    "(config.json + model.safetensors).")
    parser.add_argument("checkpoint", help="checkpoint file, run directory (newest checkpoint) or exported folder")
    parser.add_argument("out_dir", help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's, float32 from training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUTDIR")
    args = parser.parse_args(argv)
    try:
        out, config, dtype, description = _export(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
    except (ckpt.CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"aimv2-export: {exc}", file=sys.stderr)
        return 1
    kind = "native-resolution" if config.native else f"{config.image_size} px"
    print(f"aimv2-export: wrote {out} ({CONFIG_NAME}, {WEIGHTS_NAME} in {_dtype_name(dtype)}) from {description}: "
          f"{kind} encoder, width {config.enc_dim}, depth {config.enc_depth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
