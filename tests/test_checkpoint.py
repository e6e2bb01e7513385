"""Checkpoints: atomic save, keep-last-K, RNG capture, and damaged files refused with a clear error."""
import os
import random

import numpy as np
import pytest
import torch

from aimv2 import checkpoint as ckpt


def _state(step: int) -> dict:
    return {
        "step": step,
        "model": {"w": torch.randn(4, 3), "b": torch.randn(3)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w", "b"]}]},
        "scheduler": {"last_epoch": step},
        "rng": ckpt.capture_rng_state(),
        "data": {"samples_seen": step * 8},
        "train_config": {"steps": 10},
        "model_config": {"enc_dim": 64},
    }


def test_save_load_roundtrip_and_no_temporary_files(tmp_path):
    state = _state(5)
    path = ckpt.checkpoint_path(str(tmp_path), 5)
    ckpt.save_checkpoint(state, path)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["step"] == 5 and loaded["format"] == ckpt.FORMAT
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert sorted(os.listdir(ckpt.checkpoint_dir(str(tmp_path)))) == ["step_00000005.pt", "step_00000005.pt.sha256"]


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(_state(step), ckpt.checkpoint_path(str(tmp_path), step))
        ckpt.prune_checkpoints(str(tmp_path), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 5]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000005.pt")
    assert len(os.listdir(ckpt.checkpoint_dir(str(tmp_path)))) == 4  # two checkpoints, two checksums


def test_truncated_checkpoint_is_refused(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path), 3)
    ckpt.save_checkpoint(_state(3), path)
    os.remove(path + ".sha256")  # without the checksum, the torch reader must notice by itself
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(path)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path), 3)
    ckpt.save_checkpoint(_state(3), path)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="is corrupt: its SHA-256"):
        ckpt.load_checkpoint(path)


def test_foreign_and_incomplete_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(ckpt.CheckpointError, match="not an aimv2-train checkpoint"):
        ckpt.load_checkpoint(str(other))
    incomplete = _state(1)
    del incomplete["optimizer"]
    path = str(tmp_path / "incomplete.pt")
    ckpt.save_checkpoint(incomplete, path)
    with pytest.raises(ckpt.CheckpointError, match="missing \\['optimizer'\\]"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(str(tmp_path / "nope.pt"))


def test_failed_write_leaves_nothing_behind(tmp_path):
    path = ckpt.checkpoint_path(str(tmp_path), 7)
    with pytest.raises(Exception):
        ckpt.save_checkpoint({"step": 7, "model": lambda: None}, path)  # a lambda does not pickle
    assert os.listdir(ckpt.checkpoint_dir(str(tmp_path))) == []


def test_rng_state_roundtrip():
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)
    ckpt.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
