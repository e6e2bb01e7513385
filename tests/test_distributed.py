"""Two processes under torchrun (gloo on CPU) take the same steps as one process with the same
global batch: DDP, and DDP and FSDP2 with accumulation; and their checkpoints load on one process."""
import os
import socket
import subprocess
import sys

import pytest

from aimv2 import checkpoint as ckpt
from aimv2.metrics import read_metrics
from aimv2.train import train
from aimv2.train_config import TrainConfig

SMALL = {"image_size": 16, "enc_depth": 1, "dec_depth": 1}
ARGS = ["--steps", "3", "--batch-size", "8", "--max-text-len", "16", "--workers", "0", "--no-progress", "--threads", "1",
        "--backend", "torch"] + [a for k, v in SMALL.items() for a in ("--model", f"{k}={v}")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("loss", "pixel_loss", "text_loss", "lr", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *extra) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "aimv2.train", *ARGS, "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(os.path.join(out, "metrics.jsonl"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    train(TrainConfig(steps=3, batch_size=8, max_text_len=16, workers=0, progress=False, model=dict(SMALL), out=str(out), backend="torch"))
    return read_metrics(os.path.join(out, "metrics.jsonl"))


def _assert_same_steps(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for a, b in zip(got, expected):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


@pytest.mark.parametrize("extra", [(), ("--grad-accum", "2"), ("--fsdp", "--grad-accum", "2")], ids=["ddp", "ddp-accum", "fsdp-accum"])
def test_two_processes_match_one(tmp_path, single, extra):
    _assert_same_steps(_torchrun(tmp_path, *extra), single)
    # the checkpoint holds the full, unsharded state under plain parameter names
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)))
    assert state["step"] == 3 and "encoder.pos_embed" in state["model"]
    assert tuple(state["model"]["encoder.pos_embed"].shape) == (1, 16, 64)
    if "--fsdp" in extra:  # a sharded run's checkpoint continues on a single process
        summary = train(TrainConfig(steps=4, batch_size=8, max_text_len=16, workers=0, progress=False, model=dict(SMALL),
                                    out=str(tmp_path), backend="torch", resume="latest"))
        assert summary["step"] == 4


def test_two_processes_train_native_resolution_and_resume_exactly(tmp_path):
    """Packed native-resolution batches under two processes: every process's stream position is in
    the checkpoint, and a resumed run takes the same steps as the uninterrupted one."""
    native = ("--native-resolution", "--max-tokens", "256", "--max-patches", "32", "--steps", "4", "--ckpt-every", "2",
              "--keep-checkpoints", "0")
    full = _torchrun(tmp_path / "full", *native)
    middle = ckpt.checkpoint_path(str(tmp_path / "full"), 2)
    cursors = ckpt.load_checkpoint(middle)["data"]["cursors"]
    assert len(cursors) == 2 and min(cursors) >= 4  # >= 2 steps x 128 patches / at most 32 per image
    resumed = _torchrun(tmp_path / "resumed", *native, "--resume", middle)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, full[2:]):
        assert a["images"] == b["images"]
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6), (a["step"], key)
