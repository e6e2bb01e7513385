"""Native-resolution training: packed batches by a patch budget, exact resume, options and errors."""
import os

import pytest

from aimv2 import checkpoint as ckpt
from aimv2.metrics import read_metrics
from aimv2.train import train
from test_train import LOSS_KEYS, losses, small_config

# 4 px patches, sides of at least 16 px: images of 16 to 32 patches (4x4 to 4x8), 128 patches per step
NATIVE = dict(native_resolution=True, max_tokens=128, max_patches=32)


def test_native_run_packs_images_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    summary = train(small_config(full, deterministic=True, **NATIVE))  # needed for the same bits on a GPU
    assert summary["step"] == 6
    records = read_metrics(os.path.join(full, "metrics.jsonl"))
    images = [r["images"] for r in records]
    assert all(n >= 4 for n in images) and len(set(images)) > 1, images  # >= 64 / 16 images, counts vary
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(str(full), 3))
    assert state["model_config"]["native"] and state["data"]["cursors"][0] >= 12
    reference = losses(full)

    resumed = tmp_path / "resumed"
    train(small_config(resumed, resume=ckpt.checkpoint_path(str(full), 3), deterministic=True, **NATIVE))
    got = losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == reference[step], f"step {step}: {got[step]} != {reference[step]}"


def test_native_accumulation_and_blank_control_run(tmp_path):
    summary = train(small_config(tmp_path / "accum", steps=2, grad_accum=2, **NATIVE))
    assert summary["step"] == 2
    records = read_metrics(os.path.join(tmp_path / "accum", "metrics.jsonl"))
    assert all(set(LOSS_KEYS) <= set(r) for r in records)
    assert train(small_config(tmp_path / "blank", steps=1, blank_images=True, **NATIVE))["step"] == 1


def test_native_budget_must_hold_one_image(tmp_path):
    with pytest.raises(SystemExit, match="raise --max-tokens to at least 32"):
        train(small_config(tmp_path, steps=1, grad_accum=2, native_resolution=True, max_tokens=20))


def test_native_options_need_native_resolution(tmp_path):
    with pytest.raises(ValueError, match="only with --native-resolution"):
        small_config(tmp_path, max_tokens=64)
    with pytest.raises(ValueError, match="--max-patches must be an integer >= 2"):
        small_config(tmp_path, native_resolution=True, max_patches=1)


def test_square_run_resumed_as_native_is_refused(tmp_path):
    train(small_config(tmp_path, steps=1))
    with pytest.raises(SystemExit, match="square-image run"):
        train(small_config(tmp_path, steps=2, resume="latest", **NATIVE))


def test_compile_per_block_with_native_resolution_compiles_once_per_block_kind(tmp_path):
    """--compile with --native-resolution: 20 steps of packed batches of mixed sizes reuse the blocks'
    graphs (dynamic token counts): one for the encoder blocks, one for the decoder blocks, no
    recompilation per batch; the losses follow the eager run's."""
    import torch._dynamo

    from aimv2.regional_compile import graphs_compiled

    options = dict(steps=20, eval_samples=0, prediction_images=0, ckpt_every=100, **NATIVE)
    torch._dynamo.reset()
    before = graphs_compiled()
    train(small_config(tmp_path / "compiled", compile=True, **options))
    assert graphs_compiled() - before == 2
    train(small_config(tmp_path / "eager", **options))
    compiled, eager = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert sorted(compiled) == list(range(1, 21))
    for step in (1, 2, 20):
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3), step
