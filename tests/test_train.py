"""The training loop: exact resume, accumulation, output directory rules, signals, the blank control."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from aimv2 import checkpoint as ckpt
from aimv2.metrics import read_metrics
from aimv2.train import train
from aimv2.train_config import TrainConfig

# a model small enough for a few seconds per run: 16 px images (16 patches), one block each side
SMALL = {"image_size": 16, "enc_depth": 1, "dec_depth": 1}
LOSS_KEYS = ("loss", "pixel_loss", "text_loss", "lr", "grad_norm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(out, **kw) -> TrainConfig:
    options = dict(model=dict(SMALL), max_text_len=16, steps=6, batch_size=8, workers=0, progress=False,
                   ckpt_every=3, keep_checkpoints=0, out=str(out), backend="torch", eval_samples=8, prediction_images=2)
    options.update(kw)
    return TrainConfig(**options)


def losses(out) -> dict[int, tuple]:
    return {r["step"]: tuple(r[k] for k in LOSS_KEYS) for r in read_metrics(os.path.join(out, "metrics.jsonl"))}


def test_resume_from_a_mid_run_checkpoint_repeats_the_run_exactly(tmp_path):
    full = tmp_path / "full"
    summary = train(small_config(full, deterministic=True))  # needed for the same bits on a GPU
    assert summary["step"] == 6 and os.path.isfile(full / "loss.png")
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    # a new directory, resumed from the step-3 checkpoint the first run wrote on the way
    resumed = tmp_path / "resumed"
    train(small_config(resumed, resume=ckpt.checkpoint_path(str(full), 3), deterministic=True))
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == reference[step], f"step {step}: {got[step]} != {reference[step]}"

    # the same directory with --resume (latest): the run died after step 3; its log is cut back to step 3
    os.remove(ckpt.checkpoint_path(str(full), 6))
    train(small_config(full, resume="latest", deterministic=True))
    assert losses(full) == reference


def test_deterministic_holds_for_the_run_and_train_restores_the_setting(tmp_path, monkeypatch):
    """--deterministic turns torch's deterministic algorithms on (warn-only) for the run, keeps a
    caller's strict setting, and train() leaves the process's setting as it found it."""
    from aimv2 import train as train_module

    def setting():
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    seen = []
    real_step = train_module.Trainer.train_step

    def watched_step(self):
        seen.append(setting())
        return real_step(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", watched_step)
    assert setting() == (False, False)
    train(small_config(tmp_path / "off", steps=1, deterministic=True))
    assert seen == [(True, True)] and setting() == (False, False)
    torch.use_deterministic_algorithms(True)
    try:
        train(small_config(tmp_path / "strict", steps=1, deterministic=True))
        assert seen[-1] == (True, False) and setting() == (True, False)
    finally:
        torch.use_deterministic_algorithms(False)


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path):
    one = losses(train(small_config(tmp_path / "one", steps=2))["out_dir"])
    two = losses(train(small_config(tmp_path / "two", steps=2, grad_accum=4))["out_dir"])
    for step in (1, 2):
        for a, b in zip(one[step], two[step]):
            assert a == pytest.approx(b, rel=2e-5)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    train(small_config(tmp_path, steps=1))
    with pytest.raises(SystemExit, match="--resume to continue"):
        train(small_config(tmp_path, steps=1))
    summary = train(small_config(tmp_path, steps=2, overwrite=True))
    assert summary["step"] == 2 and [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2]


def test_resume_refuses_a_corrupt_checkpoint(tmp_path):
    train(small_config(tmp_path, steps=3))
    path = ckpt.latest_checkpoint(str(tmp_path))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x55
    open(path, "wb").write(bytes(data))
    with pytest.raises(SystemExit, match="is corrupt"):
        train(small_config(tmp_path, steps=6, resume="latest"))


def test_blank_images_control_hides_the_images(tmp_path):
    """With blank images the pixel loss of a step cannot depend on which samples were drawn (only on
    the prefix lengths, which come from the seed); with real images it does."""
    def first(name, **kw):
        out = train(small_config(tmp_path / name, steps=1, **kw))["out_dir"]
        return read_metrics(os.path.join(out, "metrics.jsonl"))[0]

    blank_a, blank_b = first("ba", blank_images=True), first("bb", blank_images=True, builtin_size=999)
    normal_a, normal_b = first("na"), first("nb", builtin_size=999)
    assert blank_a["pixel_loss"] == blank_b["pixel_loss"] and blank_a["text_loss"] != blank_b["text_loss"]
    assert normal_a["pixel_loss"] != normal_b["pixel_loss"]
    assert json.load(open(tmp_path / "ba" / "config.json"))["train"]["blank_images"] is True


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aimv2.train", "--steps", "100000", "--batch-size", "4", "--workers", "0", "--no-progress",
           "--threads", "1", "--max-text-len", "16", "--out", str(out), "--ckpt-every", "100000"]
    cmd += [arg for key, value in SMALL.items() for arg in ("--model", f"{key}={value}")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(str(metrics))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr
    last = read_metrics(str(metrics))[-1]["step"]
    path = ckpt.latest_checkpoint(str(out))
    assert path and ckpt.load_checkpoint(path)["step"] == last


def test_training_on_tar_shards_counts_the_corrupt_sample(tmp_path):
    from test_data_sources import _png, _write_shard

    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [(f"{i:04d}", {"png": _png(i), "txt": f"photo number {i}".encode()}) for i in range(7)]
    samples.insert(3, ("0999", {"jpg": b"garbage", "txt": b"unreadable"}))
    _write_shard(shards / "000.tar", samples)
    summary = train(small_config(tmp_path / "run", data=str(shards), steps=2, batch_size=8, max_text_len=None))
    records = read_metrics(os.path.join(summary["out_dir"], "metrics.jsonl"))
    # 8 samples per step = one epoch per step: the corrupt one is met (and replaced) once per step
    assert [r["skipped"] for r in records] == [1, 2] and summary["skipped"] == 2
    assert json.load(open(tmp_path / "run" / "config.json"))["model"]["max_text_len"] == 24  # the preset's T


def test_a_step_reads_nothing_back_and_log_every_sets_where_the_host_waits(tmp_path, monkeypatch):
    """train_step leaves its losses and gradient norm on the device (no .tolist(), float() or .item()
    of a tensor: on a GPU each would wait for the step); the loop reads them at logged and checkpoint
    steps only, and the logged record counts the images since the previous one."""
    from aimv2 import train as train_module

    reads = []
    real_step = train_module.Trainer.train_step

    def watching(name, real):
        def read(t, *args):
            caller = sys._getframe(1).f_code.co_filename  # ours, not torch's (CPU AdamW reads its step count)
            if os.sep + "aimv2" in caller:
                reads.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return real(t, *args)
        return read

    def watched_step(self):
        with pytest.MonkeyPatch.context() as m:
            for name in ("tolist", "item", "__float__"):
                m.setattr(torch.Tensor, name, watching(name, getattr(torch.Tensor, name)))
            return real_step(self)

    monkeypatch.setattr(train_module.Trainer, "train_step", watched_step)
    train(small_config(tmp_path, steps=7, log_every=3, ckpt_every=100))
    assert reads == []
    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [3, 6, 7]  # every 3rd step and the last
    assert [r["images"] for r in records] == [24, 24, 8]


def test_metrics_records_have_the_documented_fields(tmp_path):
    summary = train(small_config(tmp_path, steps=2, ckpt_every=5, eval_samples=20))
    first, last = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    fields = {"step", "loss", "pixel_loss", "text_loss", "lr", "grad_norm", "images", "samples_per_s", "elapsed_s", "skipped"}
    assert set(first) == fields
    # the last step (like every checkpoint step) scores held-out captions and draws predictions.png
    assert set(last) == fields | {"caption_exact", "caption_word_acc", "eval_samples"} and last["eval_samples"] == 20
    assert summary["caption_word_acc"] == last["caption_word_acc"]
    assert os.path.getsize(tmp_path / "predictions.png") > 10_000
    record = first
    assert record["images"] == 8
    assert record["loss"] == pytest.approx(0.4 * record["pixel_loss"] + record["text_loss"])
    assert torch.isfinite(torch.tensor(record["loss"]))
