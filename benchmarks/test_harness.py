"""Tests of the benchmark harness itself: the command line, the outputs, ratios, targets and the
work counted per case (visible attention pairs, the step's model FLOPs)."""
import csv
import os

import pytest
import torch

from aimv2_kernels.reference import prefix_visibility
from benchmarks import SUITES, attention, step
from benchmarks.__main__ import main
from benchmarks.harness import Card, Result
from benchmarks.report import OUTPUT_FILES, fill_speedups, markdown, write_outputs
from benchmarks.targets import memory_ratio, speedup_vs

HAS_CUDA = torch.cuda.is_available()


def _result(provider, ms, *, ours=False, comparable=True, size="s", peak=None):
    return Result("norm", "rms_norm", "fwd", size, 1024, provider, ours, comparable, ms=ms, peak_mib=peak, unit="GB/s",
                  metric=100.0 / ms)


def test_list_names_every_suite(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.strip().splitlines()] == list(SUITES)


def test_unknown_suite_is_an_error(capsys):
    assert main(["--suite", "norm,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU this is the real benchmark: run python -m benchmarks")
def test_cpu_run_says_it_needs_a_gpu_and_writes_three_files(tmp_path, capsys):
    assert main(["--suite", "norm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and out.index("No CUDA GPU") < out.rindex("### norm")  # the table comes last
    assert sorted(os.listdir(tmp_path)) == sorted(OUTPUT_FILES)
    text = (tmp_path / "results.md").read_text()
    assert "CPU smoke run" in text and "| rms_norm | fwd+bwd |" in text
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["provider"] for r in rows} >= {"reference", "eager", "torch.compile"}
    assert all(r["gpu"] == "none (CPU smoke)" and r["torch"] == torch.__version__ for r in rows)
    measured = [r for r in rows if r["ms"]]
    assert measured and all(float(r["ms"]) > 0 and float(r["metric"]) > 0 for r in measured)


def test_speedup_is_best_comparable_alternative_over_ours():
    rows = [_result("ours-triton", 2.0, ours=True), _result("eager", 3.0), _result("torch.compile", 2.5),
            _result("sdpa is_causal", 1.0, comparable=False)]
    fill_speedups(rows)
    assert rows[0].speedup == pytest.approx(2.5 / 2.0)
    assert all(r.speedup is None for r in rows[1:])


def test_targets_take_the_worst_size():
    rows = [_result("ours-triton", 1.0, ours=True, size="a", peak=5.0), _result("eager", 1.5, size="a", peak=100.0),
            _result("ours-triton", 2.0, ours=True, size="b", peak=20.0), _result("eager", 1.8, size="b", peak=100.0)]
    line = speedup_vs(rows, "norm", "rms_norm", "fwd", "eager", 1.0, "vs eager")
    assert "0.90 at worst over 2 size(s)" in line and "NOT met" in line
    assert "met" in speedup_vs(rows[:2], "norm", "rms_norm", "fwd", "eager", 1.0, "x").split(": ")[-1]
    mem = memory_ratio(rows, "norm", "rms_norm", "fwd", "eager", 0.1, "memory")
    assert "0.200" in mem and "NOT met" in mem
    assert "not measured" in speedup_vs(rows, "norm", "rms_norm", "fwd", "liger", 1.0, "vs liger")


def test_outputs_are_three_files_with_table_and_plot(tmp_path):
    rows = [_result("ours-triton", 1.0, ours=True), _result("eager", 2.0)]
    fill_speedups(rows)
    env = {"time": "t", "gpu": "g", "torch": "1", "cuda": "-", "triton": "3", "python": "3", "aimv2_kernels": "0",
           "commit": "c", "backends": "torch", "liger_kernel": "-", "flash_attn": "-"}
    text = markdown(env, Card("g", 1000.0, 500.0, 50.0), "python -m benchmarks", [("norm", 1.0, ["- a target"])], rows,
                    smoke=False)
    assert "| rms_norm | fwd | s | **ours-triton** | 1.000 |" in text and "2.00x" in text and "- a target" in text
    paths = write_outputs(str(tmp_path), env, text, rows, {"norm": "hidden size"})
    assert sorted(os.path.basename(p) for p in paths) == sorted(OUTPUT_FILES) == sorted(os.listdir(tmp_path))
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_visible_pairs_match_the_dense_mask():
    prefix = torch.tensor([1, 5, 0, 9, 12])  # includes 0 (plain causal) and values >= S (all visible)
    S, H = 9, 3
    dense = prefix_visibility(S, prefix)  # (B, S, S)
    assert attention.visible_pairs(prefix, H, S, "prefix") == H * int(dense.sum())
    assert attention.visible_pairs(prefix, H, S, "causal") == H * len(prefix) * S * (S + 1) // 2


def test_step_flops_match_a_flop_counter_on_the_reference_model():
    """Every weight matmul the eager reference runs in a training step is counted by
    matmul_macs_per_image (its backward needs no input gradient of the patch embedding)."""
    from torch.utils.flop_counter import FlopCounterMode

    from aimv2 import AIMv2Config
    from aimv2.reference_model import ReferenceAIMv2Model

    c, B = AIMv2Config.preset("tiny"), 3
    model = ReferenceAIMv2Model(c)
    images = torch.randn(B, c.channels, c.image_size, c.image_size)
    tokens = torch.randint(1, c.vocab_size, (B, c.max_text_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(images, tokens, torch.randint(1, c.num_patches, (B,))).total.backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    macs = step.matmul_macs_per_image(c)
    assert counts["aten.mm"] + counts["aten.addmm"] == 3 * 2 * B * (sum(macs.values()) - macs["patch_embed"])
    assert counts["aten.convolution"] == 2 * B * macs["patch_embed"]
