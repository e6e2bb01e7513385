"""aimv2-probe: how much a frozen encoder's features know, as top-1 of a small classifier on them.

    aimv2-probe --checkpoint runs/aimv2-tiny               # attentive probe, built-in shape kinds
    aimv2-probe --checkpoint runs/aimv2-tiny --compare-random
    aimv2-probe --checkpoint ckpt.pt --data images/ --probe linear

The encoder runs once, bidirectionally and without gradients, over every probe image; its patch
features (B, N, D) are cached and the probe trains on them alone. Two probes:

* attentive: a learned query attends over the layer-normed patch features (one multi-head
  cross-attention), then a linear classifier: the AIMv2 evaluation protocol, shrunk.
* linear: a linear classifier on the standardized mean of the patch features.

Data: "builtin" labels each procedurally drawn image with its shape kind (5 classes), from a seed the
trainer never uses; or an image folder `ROOT/<class>/*.jpg`, split by `ROOT/train` and `ROOT/val` when
present, else every fifth image of each class is held out. `--compare-random` also probes the same
architecture with random weights, the baseline a trained encoder must beat.

On the test split it prints a table (per class: support, recall = per-class accuracy, precision; then
top-1 and balanced accuracy; a column per encoder) and writes `probe_confusion.png` (the confusion
matrices) and `probe.json` (the numbers) into the run directory of --checkpoint, else the current
directory, or where `--out` says (see aimv2/probe_report.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import probe_report
from .cli import ArgumentParser
from .cli import run as run_command
from .config import PRESETS, AIMv2Config
from .data import KINDS, EvalTransform, ShapesDataset
from .distributed import pick_device
from .model import AIMv2Model

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# the built-in probe images come from this seed, so they are never training images (seed 0.. by default)
PROBE_SEED = 1_000_000_007


class AttentiveProbe(nn.Module):
    """(B, N, D) patch features -> (B, classes) logits via one learned query."""

    def __init__(self, dim: int, classes: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, features: Tensor) -> Tensor:
        x = self.norm(features)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x)  # (B, 1, D)
        return self.head(pooled[:, 0])


class LinearProbe(nn.Module):
    """(B, N, D) -> (B, classes): standardized mean feature, then one linear layer."""

    def __init__(self, dim: int, classes: int, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.head = nn.Linear(dim, classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.head((features.mean(dim=1) - self.mean) / self.std)


# ---- data ------------------------------------------------------------------------------------------

def builtin_split(image_size: int, train_size: int, test_size: int):
    """(train images, labels, test images, labels, class names) of built-in shapes, by shape kind."""
    ds = ShapesDataset(image_size, seed=PROBE_SEED, length=train_size + test_size)
    transform = EvalTransform(image_size)
    images = torch.stack([transform(ds.load(i)[0]) for i in range(len(ds))])
    labels = torch.tensor([ds.label(i) for i in range(len(ds))])
    return images[:train_size], labels[:train_size], images[train_size:], labels[train_size:], list(KINDS)


def _folder_items(root: str, classes: list[str]) -> list[tuple[str, int]]:
    items = []
    for label, name in enumerate(classes):
        directory = os.path.join(root, name)
        for file in sorted(os.listdir(directory)):
            if file.lower().endswith(IMAGE_EXTS):
                items.append((os.path.join(directory, file), label))
    return items


def folder_split(root: str, image_size: int):
    """An image folder ROOT/<class>/*: ROOT/train + ROOT/val when both exist, else every fifth
    image of each class for testing. Unreadable images are skipped with a count."""
    from PIL import Image

    split_dirs = [os.path.join(root, s) for s in ("train", "val")]
    base = split_dirs[0] if all(os.path.isdir(d) for d in split_dirs) else root
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if len(classes) < 2:
        raise ValueError(f"{base!r} must hold one sub-directory per class (at least 2)")
    if base != root:
        train_items, test_items = _folder_items(split_dirs[0], classes), _folder_items(split_dirs[1], classes)
    else:
        items = _folder_items(root, classes)
        per_class: dict[int, int] = {}
        train_items, test_items = [], []
        for path, label in items:
            k = per_class[label] = per_class.get(label, -1) + 1
            (test_items if k % 5 == 4 else train_items).append((path, label))
    transform = EvalTransform(image_size)

    def load(items):
        images, labels, bad = [], [], 0
        for path, label in items:
            try:
                with Image.open(path) as image:
                    images.append(transform(image))
                labels.append(label)
            except Exception:  # unreadable file: skip it, report the count
                bad += 1
        if bad:
            print(f"aimv2-probe: skipped {bad} unreadable image(s)", file=sys.stderr)
        if not images:
            raise ValueError("no readable images in one of the splits")
        return torch.stack(images), torch.tensor(labels)

    train_x, train_y = load(train_items)
    test_x, test_y = load(test_items)
    return train_x, train_y, test_x, test_y, classes


# ---- encoder and features -------------------------------------------------------------------------

def load_encoder(checkpoint: str | None, preset: str, random_init: bool, seed: int) -> tuple[nn.Module, AIMv2Config, str, dict]:
    """(encoder, config, description, info). A run directory means its newest checkpoint; info holds
    the checkpoint file and its step (None without a checkpoint) and whether the weights are trained."""
    if checkpoint is None:
        config = AIMv2Config.preset(preset)
        torch.manual_seed(seed)
        info = {"checkpoint": None, "step": None, "trained": False}
        return AIMv2Model(config).encoder, config, f"randomly initialized {preset} encoder", info
    path = ckpt.latest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else checkpoint
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint!r}")
    state = ckpt.load_checkpoint(path)
    config = AIMv2Config(**state["model_config"])
    torch.manual_seed(seed)
    model = AIMv2Model(config)
    info = {"checkpoint": path, "step": int(state["step"]), "trained": not random_init}
    if random_init:
        return model.encoder, config, f"randomly initialized encoder of {path}'s architecture", info
    model.load_state_dict(state["model"])
    return model.encoder, config, f"encoder of {path} (step {state['step']})", info


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    """Frozen, bidirectional patch features (n, N, D) in float32 on the CPU."""
    encoder = encoder.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for start in range(0, len(images), batch_size):
        with autocast:
            patch_features, _ = encoder.features(images[start:start + batch_size].to(device))
        out.append(patch_features.float().cpu())
    return torch.cat(out)


def fit_probe(kind: str, train_x: Tensor, train_y: Tensor, classes: int, steps: int, batch_size: int,
              lr: float, seed: int, device: torch.device) -> nn.Module:
    """Train a probe on cached features; return it in eval mode."""
    torch.manual_seed(seed)
    dim = train_x.shape[-1]
    if kind == "attentive":
        probe = AttentiveProbe(dim, classes)
    else:
        pooled = train_x.mean(dim=1)
        probe = LinearProbe(dim, classes, pooled.mean(0), pooled.std(0).clamp_min(1e-6))
    probe = probe.to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train_x), (min(batch_size, len(train_x)),), generator=generator)
        logits = probe(train_x[idx].to(device))
        loss = nn.functional.cross_entropy(logits, train_y[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return probe.eval()


@torch.no_grad()
def predict(probe: nn.Module, features: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    """Predicted class of each feature set, (n,) int64 on the CPU."""
    return torch.cat([probe(features[start:start + batch_size].to(device)).argmax(-1).cpu()
                      for start in range(0, len(features), batch_size)])


def train_probe(kind: str, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int,
                steps: int, batch_size: int, lr: float, seed: int, device: torch.device) -> float:
    """Train a probe on cached features; return test top-1 (a fraction)."""
    probe = fit_probe(kind, train_x, train_y, classes, steps, batch_size, lr, seed, device)
    return int((predict(probe, test_x, device) == test_y).sum()) / len(test_y)


def run_probe(args: argparse.Namespace) -> dict:
    """Probe, print the table, write the picture and probe.json. Returns {description: top-1} for each
    encoder (as always), plus "report" (the contents of probe.json), "png" and "json" (the paths)."""
    device = pick_device(args.device)
    encoder, config, description, info = load_encoder(args.checkpoint, args.preset, args.random_init, args.seed)
    if args.data == "builtin":
        train_x, train_y, test_x, test_y, classes = builtin_split(config.image_size, args.train_size, args.test_size)
    else:
        train_x, train_y, test_x, test_y, classes = folder_split(args.data, config.image_size)
    encoders = [("trained" if info["trained"] else "random", description, encoder)]
    if args.compare_random and not args.random_init:
        torch.manual_seed(args.seed)
        encoders.append(("random", "randomly initialized encoder, same architecture", AIMv2Model(dataclasses.replace(config)).encoder))
    results, metrics, entries = {}, {}, []
    for label, name, enc in encoders:
        ftrain, ftest = extract_features(enc, train_x, device), extract_features(enc, test_x, device)
        probe = fit_probe(args.probe, ftrain, train_y, len(classes), args.steps, args.batch_size, args.lr, args.seed, device)
        m = metrics[label] = probe_report.probe_metrics(test_y, predict(probe, ftest, device), classes)
        results[name] = m["top1"]
        entries.append({"label": label, "description": name, **m})
        print(f"top-1 {m['top1'] * 100:.1f}%  {args.probe} probe, {name}; {len(train_x)} train / {len(test_x)} test images, "
              f"{len(classes)} classes (chance {100 / len(classes):.1f}%)")
    print()
    print(probe_report.format_table(metrics))
    margin = None
    if len(entries) == 2:
        margin = entries[0]["top1"] - entries[1]["top1"]
        print(f"margin over the random encoder: {margin * 100:+.1f} points")
    report = {
        "probe": args.probe,
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "data": args.data,
        "images": {"train": len(train_x), "test": len(test_x)},
        "classes": list(classes),
        "chance": 1 / len(classes),
        "top1": entries[0]["top1"],
        "margin": margin,
        "encoders": entries,
    }
    png, json_path = probe_report.output_paths(args.out, args.checkpoint)
    title = f"{args.probe} probe"
    if info["checkpoint"] is not None:
        title += f", {info['checkpoint']}" + (f" (step {info['step']})" if info["trained"] else " architecture, random weights")
    else:
        title += f", randomly initialized {args.preset} encoder"
    probe_report.write_confusion_png(metrics, png, title)
    probe_report.write_json(report, json_path)
    print(f"wrote {png} and {json_path}")
    return {**results, "report": report, "png": png, "json": json_path}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="aimv2-probe", description="Probe a frozen AIMv2 encoder: prints per-class "
                                     "and top-1 accuracy, writes the confusion matrix and the numbers.")
    parser.add_argument("--checkpoint", help="checkpoint file or run directory (newest checkpoint); omit for a random encoder")
    parser.add_argument("--preset", default="tiny", help="architecture without --checkpoint (default: tiny)")
    parser.add_argument("--random-init", action="store_true", help="use the checkpoint's architecture with random weights")
    parser.add_argument("--compare-random", action="store_true", help="also probe a randomly initialized encoder")
    parser.add_argument("--data", default="builtin", help="'builtin' (shape kinds) or an image folder ROOT/<class>/*")
    parser.add_argument("--probe", choices=("attentive", "linear"), default="attentive")
    parser.add_argument("--train-size", type=int, default=3000, help="built-in training images (default: 3000)")
    parser.add_argument("--test-size", type=int, default=1000, help="built-in test images (default: 1000)")
    parser.add_argument("--steps", type=int, default=1000, help="probe optimizer steps (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="directory for probe_confusion.png and probe.json, or the picture's path (*.png; "
                                      "the JSON beside it); default: the checkpoint's run directory, else '.'")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values argparse's types do not check: one line and exit status 2 for a bad one."""
    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    for flag in ("train_size", "test_size", "steps", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0, or 2 / 1 with one line for a bad option / a failed probe (aimv2.cli)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    def body() -> int:
        run_probe(args)
        return 0

    return run_command("aimv2-probe", body, argv, failures=(ValueError, ckpt.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
