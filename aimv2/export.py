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

The other direction is pretrained.py (`AIMv2Encoder.from_pretrained`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid

import torch
from torch import Tensor

from . import checkpoint as ckpt
from .cli import ArgumentParser
from .cli import run as run_command
from .config import AIMv2Config
from .encoder import AIMv2Encoder
from .interop import transformers_config_kwargs
from .pretrained import (CONFIG_NAME, DTYPES, VISION_CONFIG_DEFAULTS, VISION_MODEL_TYPE, WEIGHT_FILES, WEIGHTS_NAME,
                         read_pretrained, resolve_dtype)

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
    target = resolve_dtype(dtype)
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
    """The command: exit status 0, or 2 / 1 with one line for a bad option / a failed export (aimv2.cli)."""
    parser = ArgumentParser(
        prog="aimv2-export",
        description="Export the encoder of a training checkpoint as a transformers Aimv2VisionModel folder "
                    "(config.json + model.safetensors).")
    parser.add_argument("checkpoint", help="checkpoint file, run directory (newest checkpoint) or exported folder")
    parser.add_argument("out_dir", help="output folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the checkpoint's, float32 from training)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUTDIR")
    args = parser.parse_args(argv)

    def body() -> int:
        out, config, dtype, description = _export(args.checkpoint, args.out_dir, args.dtype, args.overwrite)
        kind = "native-resolution" if config.native else f"{config.image_size} px"
        print(f"aimv2-export: wrote {out} ({CONFIG_NAME}, {WEIGHTS_NAME} in {_dtype_name(dtype)}) from {description}: "
              f"{kind} encoder, width {config.enc_dim}, depth {config.enc_depth}")
        return 0

    # FileExistsError and FileNotFoundError are OSErrors
    return run_command("aimv2-export", body, argv, failures=(ckpt.CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
