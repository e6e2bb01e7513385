"""Run options of `aimv2-train`: one dataclass, filled from defaults, a YAML/JSON file and the CLI.

Precedence: defaults < `--config FILE` < command-line flags. Every field is a flag with dashes
(`batch_size` -> `--batch-size`); booleans also have `--no-...`; `--model KEY=VALUE` (repeatable)
overrides one field of the model preset, e.g. `--model enc_depth=2`. In a config file, keys are the
field names (dashes or underscores), and `model` is a mapping.

When resuming, the run starts from the options stored in the checkpoint and applies only those given
explicitly now (`explicit` records which), so `aimv2-train --resume --out DIR` continues the run as it
was configured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .cli import ArgumentParser, UsageError
from .config import PRESETS, AIMv2Config


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # ---- model ----
    preset: str = _opt("tiny", "model preset: tiny, large, huge, 1b, 3b")
    model: dict = field(default_factory=dict, metadata={"help": "override one AIMv2Config field of the preset, KEY=VALUE (repeatable)"})
    max_text_len: int | None = _opt(None, "caption tokens T; default: the preset's, raised to fit every built-in caption")
    tokenizer: str = _opt("bytes", "'bytes' or a local tokenizers .json / SentencePiece .model file")
    # ---- data ----
    data: str = _opt("builtin", "'builtin' (procedural shapes), a .tar shard, a directory of shards, or a .jsonl file")
    builtin_size: int = _opt(1_000_000, "number of distinct built-in samples")
    workers: int | None = _opt(None, "data loader worker processes per training process, 0 loads in the training process (default: half the CPU cores shared among the local processes, 1 to 8)")
    native_resolution: bool = _opt(False, "train a native-resolution model (2-D sin-cos positions) on images at their own sizes and aspect ratios, packed into batches by --max-tokens")
    max_tokens: int | None = _opt(None, "with --native-resolution: image patches per optimizer step over all processes and micro-batches; images are added while they fit (default: --batch-size x the preset's patches per image)")
    max_patches: int | None = _opt(None, "with --native-resolution: the most patches one image may have; larger images shrink, keeping their aspect ratio (default: the preset's patches per image)")
    blank_images: bool = _opt(False, "replace every image by the blank (mean) image: the control run that shows captions are learned from pixels")
    # ---- optimization ----
    steps: int = _opt(700, "optimizer steps")
    batch_size: int = _opt(64, "global batch per optimizer step (over all processes and accumulation)")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak")
    warmup_steps: int | None = _opt(None, "linear warm-up steps (default: 5%% of --steps)")
    weight_decay: float = _opt(0.05, "AdamW decoupled weight decay on linear and conv weights")
    betas: tuple = _opt((0.9, 0.95), "AdamW betas", nargs=2, type=float)
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    seed: int = _opt(0, "seed of model init, data order, augmentation and prefix lengths")
    # ---- execution ----
    device: str = _opt("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    backend: str | None = _opt(None, "aimv2_kernels backend: auto, triton, cuda or torch (default: AIMV2_KERNELS_BACKEND or auto)")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's choice)")
    compile: bool = _opt(False, "torch.compile each transformer block (dynamic token counts with --native-resolution)")
    amp: bool = _opt(True, "bf16 autocast on CUDA (CPU always runs fp32)")
    deterministic: bool = _opt(False, "deterministic algorithms (warn-only where torch has none), which exact resume on a GPU needs; slower: the attention backward takes its 7-GEMM path")
    fsdp: bool = _opt(False, "under torchrun, shard with FSDP2 (fully_shard) instead of DDP")
    # ---- output ----
    out: str | None = _opt(None, "output directory (default: runs/aimv2-<preset>, with -blank for --blank-images)")
    overwrite: bool = _opt(False, "start afresh in an output directory that already holds checkpoints (deletes them)")
    resume: str | None = _opt(None, "resume from a checkpoint file, or with no value from the latest one in --out", nargs="?", const="latest", metavar="PATH")
    ckpt_every: int = _opt(200, "save a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _opt(3, "keep only the newest K checkpoints (0 keeps all)")
    log_every: int = _opt(1, "write metrics every N steps (only there does the host wait for the GPU and check the loss is finite)")
    eval_samples: int = _opt(256, "held-out samples whose greedy captions are scored at every checkpoint and at the end (0: off)")
    prediction_images: int = _opt(8, "held-out images drawn in predictions.png at every checkpoint and at the end (0: off)")
    progress: bool = _opt(True, "show a progress bar")
    # names given explicitly on the command line or in the config file; None: all of them
    explicit: tuple | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        """Checks every option that can be checked without touching files; a bad one raises
        UsageError (a ValueError) naming its flag."""
        try:
            self._check()
        except UsageError:
            raise
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc)) from exc

    def _check(self) -> None:
        self.betas = tuple(self.betas)
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model overrides must be a mapping, got {type(self.model).__name__}")
        try:  # unknown fields and values the model rejects (e.g. a width its heads do not divide)
            AIMv2Config.preset(self.preset, **{"native": self.native_resolution, **self.model})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--model {' '.join(f'{k}={v}' for k, v in self.model.items())}: {exc}") from exc
        positive = ("steps", "batch_size", "grad_accum", "builtin_size", "ckpt_every", "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.workers is None:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            self.workers = max(1, min(8, (os.cpu_count() or 2) // (2 * local_processes)))
        for name in ("workers", "keep_checkpoints", "eval_samples", "prediction_images", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        for name in ("max_tokens", "max_patches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 2, got {value!r}")
            if value is not None and not self.native_resolution:
                raise ValueError(f"--{name.replace('_', '-')} applies only with --native-resolution")

    @property
    def out_dir(self) -> str:
        if self.out:
            return self.out
        suffix = ("-native" if self.native_resolution else "") + ("-blank" if self.blank_images else "")
        return os.path.join("runs", f"aimv2-{self.preset}{suffix}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("explicit")
        d["betas"] = list(self.betas)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _parse_scalar(text: str) -> Any:
    """A --model value: int, float, bool, null or a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _model_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--model expects KEY=VALUE, got {text!r}")
    return key.strip(), _parse_scalar(value.strip())


def _optional(cast):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="aimv2-train",
        description="Pre-train AIMv2 (encoder + multimodal decoder). With no arguments: the tiny preset on built-in data.",
        argument_default=argparse.SUPPRESS,  # only flags actually given appear in the namespace
    )
    parser.add_argument("--config", help="YAML or JSON file of options (flags given here override it)")
    for name, f in FIELDS.items():
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta["help"] if default in (None, {}) else f"{meta['help']} (default: {default!r})"
        if name == "model":
            parser.add_argument(flag, dest=name, action="append", type=_model_override, metavar="KEY=VALUE", help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif "nargs" in meta:
            kw = {k: meta[k] for k in ("nargs", "const", "type", "metavar") if k in meta}
            parser.add_argument(flag, dest=name, help=help_text, **kw)
        else:
            annotation = str(f.type)
            cast = int if "int" in annotation else float if "float" in annotation else str
            if "None" in annotation:
                cast = _optional(cast)
            parser.add_argument(flag, dest=name, type=cast, help=help_text)
    return parser


def load_config_file(path: str) -> dict:
    """Options from a .yaml/.yml/.json file, keys normalized to field names."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(f) or {}
        elif path.endswith(".json"):
            raw = json.load(f)
        else:
            raise ValueError(f"config file {path!r} must end in .yaml, .yml or .json")
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of options")
    options = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(k for k in options if k not in FIELDS or FIELDS[k].metadata.get("cli") is False)
    if unknown:
        raise ValueError(f"config file {path!r}: unknown option(s) {unknown}")
    return options


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig for a command line (defaults < config file < flags)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)  # read by the command's error handling (cli.debugging), not an option
    try:
        options = load_config_file(args.pop("config")) if "config" in args else {}
    except OSError as exc:
        parser.error(f"--config: {exc}")
    except ValueError as exc:
        parser.error(str(exc))
    model = dict(options.get("model") or {})
    if "model" in args:
        model.update(dict(args.pop("model")))
    options.update(args)
    if model:
        options["model"] = model
    try:
        return TrainConfig(**options, explicit=tuple(sorted(options)))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))


def merge_for_resume(saved: dict, current: TrainConfig) -> TrainConfig:
    """The stored options of a run, with the options given explicitly now applied on top."""
    if current.explicit is None:
        return current
    known = {k: v for k, v in saved.items() if k in FIELDS and k != "explicit"}
    known.update({name: getattr(current, name) for name in current.explicit})
    return TrainConfig(**known, explicit=current.explicit)
