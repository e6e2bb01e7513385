"""Tests of the benchmark harness itself: the command line, the outputs, ratios, targets and the
work counted per case (visible attention pairs, the step's model FLOPs)."""
import csv
import json
import os

import pytest
import torch

from aimv2_kernels.reference import prefix_visibility
from benchmarks import SUITES, attention, loss, step
from benchmarks import providers as P
from benchmarks.__main__ import main
from benchmarks.harness import Card, Context, Result
from benchmarks.report import OUTPUT_FILES, fill_speedups, json_document, markdown, write_outputs
from benchmarks.targets import Verdict, memory_ratio, speedup_vs

HAS_CUDA = torch.cuda.is_available()


RECORD_FIELDS = {"suite", "op", "mode", "provider", "shape", "dtype", "ms", "metric", "unit", "roof_frac", "peak_mib",
                 "ours", "comparable", "ratio_to", "extra", "note"}
TARGET_FIELDS = {"suite", "label", "value", "threshold", "sense", "met", "sizes", "informational", "line"}
ENV = {"time": "t", "gpu": "g", "torch": "1", "cuda": "-", "triton": "3", "python": "3", "aimv2_kernels": "0",
       "commit": "c", "backends": "torch", "liger_kernel": "-", "flash_attn": "-", "cut_cross_entropy": "-"}


def _result(provider, ms, *, ours=False, comparable=True, size="s", peak=None):
    return Result("norm", "rms_norm", "fwd", size, 1024, provider, ours, comparable, ms=ms, peak_mib=peak, unit="GB/s",
                  metric=None if ms is None else 100.0 / ms, dtype="bfloat16")


def _gpu_context() -> Context:
    """A context that takes the GPU branch of the provider builders (nothing runs on it)."""
    return Context(torch.device("cuda"), quick=True, card=Card("test", 1.0, 1.0, 0.0))


def test_list_names_every_suite(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.strip().splitlines()] == list(SUITES)


def test_unknown_suite_is_an_error(capsys):
    assert main(["--suite", "norm,nope"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One CPU smoke run of norm and loss into a fresh folder: (folder, what it printed)."""
    if HAS_CUDA:
        pytest.skip("on a GPU this is the real benchmark: run python -m benchmarks")
    out_dir = tmp_path_factory.mktemp("smoke")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--quick", "--suite", "norm,loss", "--out", str(out_dir)]) == 0
    return out_dir, printed.getvalue()


def test_cpu_run_says_it_needs_a_gpu_and_writes_four_files(smoke_run):
    out_dir, out = smoke_run
    assert "No CUDA GPU" in out and out.index("No CUDA GPU") < out.rindex("### norm")  # the table comes last
    assert sorted(os.listdir(out_dir)) == sorted(OUTPUT_FILES) and len(OUTPUT_FILES) <= 4
    text = (out_dir / "results.md").read_text()
    assert "CPU smoke run" in text and "| rms_norm | fwd+bwd |" in text
    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    assert {r["provider"] for r in rows} >= {"reference", "eager", "torch.compile"}
    assert all(r["gpu"] == "none (CPU smoke)" and r["torch"] == torch.__version__ for r in rows)
    measured = [r for r in rows if r["ms"]]
    assert measured and all(float(r["ms"]) > 0 and float(r["metric"]) > 0 for r in measured)


def test_smoke_run_json_has_records_targets_and_skip_reasons(smoke_run):
    out_dir, _ = smoke_run
    doc = json.loads((out_dir / "results.json").read_text())
    assert set(doc) == {"env", "card", "records", "targets"}
    assert doc["env"]["gpu"] == "none (CPU smoke)" and doc["env"]["torch"] == torch.__version__
    assert "--suite norm,loss" in doc["env"]["command"] and doc["env"]["card"]
    assert set(doc["card"]) == {"copy_gbps", "matmul_tflops", "l2_mib"} and doc["card"]["copy_gbps"] > 0
    records = doc["records"]
    assert records and all(set(r) == RECORD_FIELDS for r in records)
    assert {r["suite"] for r in records} == {"norm", "loss"} and all(r["dtype"] == "float32" for r in records)
    units = {r["suite"]: r["unit"] for r in records}
    assert units == {"norm": "GB/s", "loss": "Mtok/s"}
    # our measured rows name every other measured provider of their case, with its ms over ours
    for r in records:
        same_case = [o for o in records if (o["suite"], o["op"], o["mode"], o["shape"]) ==
                     (r["suite"], r["op"], r["mode"], r["shape"]) and o is not r and o["ms"]]
        if r["ours"] and r["ms"]:
            assert r["ratio_to"] == pytest.approx({o["provider"]: o["ms"] / r["ms"] for o in same_case})
            assert "eager" in r["ratio_to"] or "eager materialized" in r["ratio_to"]
        else:
            assert r["ratio_to"] == {}
    skipped = {r["provider"]: r["note"] for r in records if r["ms"] is None}
    assert skipped["liger FLCE + torch MSE"] == "skipped: Liger-Kernel needs a CUDA GPU"
    assert skipped["cce + torch MSE"] == "skipped: cut-cross-entropy needs a CUDA GPU"
    assert skipped["torch.compile"].startswith("skipped: ")
    targets = doc["targets"]
    assert targets and all(set(t) == TARGET_FIELDS for t in targets)
    assert {t["suite"] for t in targets} == {"norm", "loss"}
    by_label = {t["label"]: t for t in targets}
    liger = by_label["loss fwd+bwd vs Liger FLCE + MSE"]
    assert liger["met"] is None and liger["value"] is None and liger["threshold"] == 1.2
    assert by_label["loss fwd+bwd vs Cut Cross-Entropy + MSE"]["informational"] is True
    roof = by_label["RMSNorm fwd, fraction of copy bandwidth"]
    assert roof["threshold"] == 0.9 and roof["sense"] == ">=" and roof["met"] in (True, False)
    assert roof["value"] == pytest.approx(min(r["roof_frac"] for r in records
                                              if r["suite"] == "norm" and r["mode"] == "fwd" and r["ours"] and r["ms"]))


def test_speedup_is_best_comparable_alternative_over_ours():
    rows = [_result("ours-triton", 2.0, ours=True), _result("eager", 3.0), _result("torch.compile", 2.5),
            _result("sdpa is_causal", 1.0, comparable=False)]
    fill_speedups(rows)
    assert rows[0].speedup == pytest.approx(2.5 / 2.0)
    assert all(r.speedup is None for r in rows[1:])


def test_targets_take_the_worst_size():
    rows = [_result("ours-triton", 1.0, ours=True, size="a", peak=5.0), _result("eager", 1.5, size="a", peak=100.0),
            _result("ours-triton", 2.0, ours=True, size="b", peak=20.0), _result("eager", 1.8, size="b", peak=100.0)]
    verdict = speedup_vs(rows, "norm", "rms_norm", "fwd", "eager", 1.0, "vs eager")
    assert (verdict.value, verdict.sizes, verdict.met) == (pytest.approx(0.9), 2, False)
    assert "0.90 at worst over 2 size(s)" in verdict.line() and "NOT met" in verdict.line()
    assert speedup_vs(rows[:2], "norm", "rms_norm", "fwd", "eager", 1.0, "x").line().endswith(": met")
    mem = memory_ratio(rows, "norm", "rms_norm", "fwd", "eager", 0.1, "memory")
    assert mem.value == pytest.approx(0.2) and mem.met is False and mem.sense == "<="
    assert "0.200" in mem.line() and "NOT met" in mem.line()
    missing = speedup_vs(rows, "norm", "rms_norm", "fwd", "liger", 1.0, "vs liger", informational=True)
    assert missing.met is None and missing.line() == "- vs liger: not measured (informational)"
    assert missing.record() == {"suite": "norm", "label": "vs liger", "value": None, "threshold": 1.0, "sense": ">=",
                                "met": None, "sizes": 0, "informational": True,
                                "line": "- vs liger: not measured (informational)"}


def test_ratio_to_covers_every_other_measured_provider_of_the_same_case():
    rows = [_result("ours-triton", 2.0, ours=True), _result("ours-cuda", 1.0, ours=True), _result("eager", 3.0),
            _result("sdpa is_causal", 1.0, comparable=False), _result("liger", None),
            _result("eager", 8.0, size="other size")]
    rows[4].note = "skipped: Liger-Kernel needs a CUDA GPU"
    doc = json_document(ENV, Card("g", 1000.0, 500.0, 50.0), rows, [])
    triton, cuda, eager, causal, liger, _ = doc["records"]
    assert triton["ratio_to"] == {"ours-cuda": 0.5, "eager": 1.5, "sdpa is_causal": 0.5}
    assert cuda["ratio_to"] == {"ours-triton": 2.0, "eager": 3.0, "sdpa is_causal": 1.0}
    assert eager["ratio_to"] == causal["ratio_to"] == liger["ratio_to"] == {}
    assert liger["ms"] is None and liger["note"] == "skipped: Liger-Kernel needs a CUDA GPU"
    assert triton["shape"] == "s" and triton["dtype"] == "bfloat16" and doc["card"]["matmul_tflops"] == 500.0


def test_a_peer_that_does_not_import_is_skipped_with_the_reason():
    def missing():
        raise ModuleNotFoundError("No module named 'cut_cross_entropy'")

    p = P.peer(_gpu_context(), "cce + torch MSE", "cut-cross-entropy", missing)
    assert p.skip == ("skipped: cut-cross-entropy does not import "
                      "(ModuleNotFoundError: No module named 'cut_cross_entropy')")
    cpu = Context(torch.device("cpu"), quick=True, card=Card("test", 1.0, 1.0, 0.0))
    assert P.peer(cpu, "x", "cut-cross-entropy", missing).skip == "skipped: cut-cross-entropy needs a CUDA GPU"
    assert P.peer(_gpu_context(), "x", "lib", lambda: (lambda a: a)).skip is None
    # loss.py wires Cut Cross-Entropy through the same helper
    assert {p.name: p for p in loss.providers(cpu)}[loss.CCE].skip == "skipped: cut-cross-entropy needs a CUDA GPU"


def test_outputs_are_four_files_with_table_json_and_plot(tmp_path):
    rows = [_result("ours-triton", 1.0, ours=True), _result("eager", 2.0)]
    fill_speedups(rows)
    card = Card("g", 1000.0, 500.0, 50.0)
    verdicts = [Verdict("norm", "a target", 2.0, 1.0, sizes=1)]
    text = markdown(ENV, card, "python -m benchmarks", [("norm", 1.0, verdicts)], rows, smoke=False)
    assert "| rms_norm | fwd | s | **ours-triton** | 1.000 |" in text and "2.00x" in text
    assert "- a target: 2.00 at worst over 1 size(s) (target >= 1.00): met" in text
    paths = write_outputs(str(tmp_path), ENV, card, text, rows, verdicts, {"norm": "hidden size"})
    assert sorted(os.path.basename(p) for p in paths) == sorted(OUTPUT_FILES) == sorted(os.listdir(tmp_path))
    assert (tmp_path / "results.png").stat().st_size > 1000
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["targets"] == [verdicts[0].record()] and doc["targets"][0]["met"] is True
    assert [r["provider"] for r in doc["records"]] == ["ours-triton", "eager"] and doc["env"]["card"] == "g"


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
