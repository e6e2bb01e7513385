"""Training checkpoints: atomic writes, a checksum, validation on load, the last K kept.

A checkpoint is one `torch.save` file `<out>/checkpoints/step_00000100.pt` holding plain data only
(tensors, numbers, strings, lists, dicts), so it loads with `weights_only=True`:

    format, version, step, model, optimizer, scheduler, rng, data (sample position),
    train_config, model_config, metrics (running counters such as skipped samples)

Writing goes to a temporary file in the same directory, is flushed and fsync'ed, then renamed over
the final name, so a crash never leaves a half-written `step_*.pt`. A `.sha256` file beside it
records the checksum; loading verifies it, so a file damaged later (disk, copy) is refused with a
clear error instead of resuming from garbage.
"""
from __future__ import annotations

import glob
import hashlib
import os
import random
import re

import numpy as np
import torch

FORMAT = "aimv2-train-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "step", "model", "optimizer", "scheduler", "rng", "data", "train_config", "model_config")
_NAME = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, checksum mismatch or wrong contents."""


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(out_dir), f"step_{step:08d}.pt")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every finished checkpoint under out_dir, oldest first."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(out_dir), "step_*.pt")):
        match = _NAME.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(directory: str) -> None:
    """fsync a file or directory by path (a rename is durable once its directory is synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Call write(file) on a temporary file, fsync it and rename it to `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(path) or ".")


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` atomically to `path`, then its checksum to `path.sha256`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    _atomic_write(path, lambda f: torch.save(state, f))
    checksum = _sha256(path)
    _atomic_write(path + ".sha256", lambda f: f.write(f"{checksum}  {os.path.basename(path)}\n".encode()))


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(out_dir)[:-keep]:
        for victim in (path, path + ".sha256"):
            if os.path.exists(victim):
                os.remove(victim)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and validate a checkpoint; raise CheckpointError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    sidecar = path + ".sha256"
    if os.path.isfile(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            fields = f.read().split()
        expected = fields[0] if fields else ""
        actual = _sha256(path)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupt: its SHA-256 {actual[:16]}... does not match the "
                f"{expected[:16]}... recorded when it was written; resume from an earlier checkpoint instead"
            )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated and cannot be loaded ({type(exc).__name__}: {exc}); "
            "resume from an earlier checkpoint instead"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an aimv2-train checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {state.get('version')}, this trainer reads {VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: missing {missing}")
    return state


def capture_rng_state() -> dict:
    """Python, numpy and torch (CPU and every CUDA device) RNG states as plain data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        for device, cuda_state in enumerate(cuda_states):
            torch.cuda.set_rng_state(cuda_state, device)
