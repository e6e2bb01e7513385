"""Tests of the benchmark harness itself: the command line, the outputs, ratios, targets and the
work counted per case (visible attention pairs, the step's model FLOPs)."""
import csv
import json
import os

import pytest
import torch

from aimv2_kernels.reference import prefix_visibility
from benchmarks import SUITES, attention, loss, step, varlen
from benchmarks import providers as P
from benchmarks.__main__ import main
from benchmarks.harness import FWD, FWD_BWD, Card, Case, Context, Provider, Result, run_case
from benchmarks.report import OUTPUT_FILES, fill_speedups, json_document, markdown, write_outputs
from benchmarks.targets import Verdict, memory_ratio, speedup_vs

HAS_CUDA = torch.cuda.is_available()


RECORD_FIELDS = {"suite", "op", "mode", "provider", "shape", "dtype", "elements", "ms", "metric", "unit", "roof_frac", "peak_mib",
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
    # the GEMM floor runs in the same run: every measured row of ours reads against it
    floor = by_label["loss fwd+bwd: GEMM floor / ours"]
    assert floor["threshold"] == pytest.approx(1 / 1.15) and floor["value"] is not None
    assert all(loss.FLOOR in r["ratio_to"] for r in records if r["suite"] == "loss" and r["ours"] and r["ms"])
    assert 2048 in loss.TOKENS and 2048 in loss.TOKENS_QUICK
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


# ---- varlen ----------------------------------------------------------------------------------------

def _varlen_batch():
    return varlen.draw_batch(*varlen.SMOKE_SHAPES[0], seed=7)


def test_varlen_batch_pairs_and_flex_mask_match_a_block_diagonal_prefix_mask():
    batch = _varlen_batch()
    assert (batch.prefix >= 1).all() and (batch.prefix < batch.lengths).all()
    assert batch.lengths.min() >= varlen.SMOKE_SHAPES[0][1] and batch.lengths.max() <= varlen.SMOKE_SHAPES[0][2]
    T, bounds = batch.tokens, batch.cu_seqlens.tolist()
    want = torch.zeros(T, T, dtype=torch.bool)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        want[a:b, a:b] = prefix_visibility(b - a, batch.prefix[s : s + 1])[0]
    idx = torch.arange(T)
    got = varlen.doc_prefix_mask_mod(batch)(0, 0, idx.view(T, 1), idx.view(1, T))
    assert torch.equal(got, want)
    assert varlen.useful_pairs(batch) == batch.heads * int(want.sum())
    x = torch.randn(T, 3, 2)
    assert torch.equal(varlen.unpad(varlen.pad(x, batch), batch), x)


def test_varlen_ours_padded_and_sdpa_agree_on_the_valid_rows():
    """Same values in the packed and padded inputs, so every provider computes the same outputs and
    (for an output gradient that is zero on the padding) the same input gradients on the valid rows."""
    import aimv2_kernels as ak

    if HAS_CUDA:
        pytest.skip("CPU check of the smoke sizes; the GPU runs the suite itself")
    batch = _varlen_batch()
    packed, padded, dense, _ = varlen.make_inputs(batch, torch.float32, torch.device("cpu"), True)
    assert torch.equal(varlen.unpad(padded, batch), packed)
    dout = torch.randn(batch.tokens, batch.heads, batch.dim)
    with ak.use_backend("triton"):
        ours = varlen.ours_fn(packed, padded, dense, batch)  # (T, H, D)
        pad_out = varlen.padded_fn(packed, padded, dense, batch)  # (B, H, S, D)
        (ours * dout).sum().backward()
        (pad_out * varlen.pad(dout, batch).transpose(1, 2)).sum().backward()
    sdpa = varlen.unpad(varlen.sdpa_dense(packed, padded, dense, batch).transpose(1, 2), batch)
    pad_rows = varlen.unpad(pad_out.transpose(1, 2), batch)
    torch.testing.assert_close(pad_rows, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sdpa, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(varlen.unpad(padded.grad, batch), packed.grad, atol=1e-4, rtol=1e-4)


def test_varlen_smoke_run_measures_ours_and_the_padded_batch(tmp_path):
    if HAS_CUDA:
        pytest.skip("on a GPU this is the real benchmark: run python -m benchmarks --suite varlen")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--quick", "--suite", "varlen", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    records = doc["records"]
    assert {r["suite"] for r in records} == {"varlen"} and all(set(r) == RECORD_FIELDS for r in records)
    by = {(r["provider"], r["mode"]): r for r in records}
    for mode in ("fwd", "fwd+bwd"):
        for name in ("ours-triton", varlen.PADDED, "sdpa dense mask"):
            assert by[(name, mode)]["ms"] > 0 and by[(name, mode)]["unit"] == "TFLOP/s", (name, mode)
        assert by[("ours-triton", mode)]["ours"] and not by[(varlen.PADDED, mode)]["ours"]
        assert varlen.PADDED in by[("ours-triton", mode)]["ratio_to"]
        assert by[("flex", mode)]["note"] == by[("flex+mask", mode)]["note"] == "skipped: FlexAttention needs a CUDA GPU"
        # the same useful work for every provider: TFLOP/s * ms is constant across a case
        work = {r["metric"] * r["ms"] for r in records if r["mode"] == mode and r["ms"]}
        assert max(work) == pytest.approx(min(work))
    deterministic = "ours-triton" + P.DETERMINISTIC_SUFFIX  # the other Triton backward, fwd+bwd only
    assert by[(deterministic, "fwd+bwd")]["ms"] > 0 and by[(deterministic, "fwd+bwd")]["ours"]
    assert by[(deterministic, "fwd")]["note"] == "skipped: same forward as ours-triton"
    targets = {t["label"]: t for t in doc["targets"]}
    assert len(targets) == 2 and all(t["threshold"] == 1.5 and t["sense"] == ">=" for t in targets.values())
    assert all(t["value"] is not None and t["met"] in (True, False) for t in targets.values())


@pytest.mark.parametrize("name,cls", [
    ("void aimv2::hopper_attention::attention_fwd_sm90_kernel<Traits<cutlass::bfloat16_t, 128>>(Params)", "attention"),
    ("attention_bwd_dkdv_kernel", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("_rms_norm_bwd_kernel", "norm"), ("_swiglu_fwd_kernel", "swiglu"), ("_ce_rows_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise and casts"),
    ("some_unknown_kernel", "other"),
])
def test_step_breakdown_classes_kernels_by_name(name, cls):
    from benchmarks import step_breakdown

    assert step_breakdown.classify(name) == cls


def test_step_breakdown_of_a_cpu_step_names_its_classes():
    from benchmarks import step_breakdown

    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    totals = step_breakdown.time_by_class(lambda: torch.nn.functional.silu(x @ w).sum().backward(),
                                          torch.device("cpu"))
    assert "gemm" in totals and all(ms >= 0 for ms in totals.values())
    assert step_breakdown.summary({"gemm": 3.0, "idle": 1.0}) == "gemm 75% (3.0 ms), idle 25% (1.0 ms)"


# ---- host suite and GPU time ------------------------------------------------------------------------

def test_host_suite_runs_here_and_reports_ratios_to_pytorch(tmp_path, monkeypatch):
    """The host suite runs on any machine: every op timed on our torch backend and PyTorch's own, our
    rows carrying ours / PyTorch's, the SPEC bounds as targets (values not asserted: no timing checks)."""
    import contextlib
    import io

    from benchmarks import host

    monkeypatch.setattr(host, "ROUND_SECONDS", 0.002)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--quick", "--suite", "host", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    records = doc["records"]
    assert {r["op"] for r in records} == {op.name for op in host.host_ops()}
    for op in {r["op"] for r in records}:
        rows = {r["provider"]: r for r in records if r["op"] == op}
        assert {"ours-torch", "pytorch"} <= set(rows) and all(r["ms"] > 0 for r in rows.values())
        ours = rows["ours-torch"]
        assert ours["ours"] and ours["extra"]["x PyTorch"] == pytest.approx(ours["ms"] / rows["pytorch"]["ms"], rel=0.01)
        assert "load" in ours["extra"]
    targets = {t["label"]: t for t in doc["targets"]}
    assert {t["threshold"] for t in targets.values()} == {1.5, 2.0} and all(t["sense"] == "<=" for t in targets.values())
    assert len(targets) == len(host.TARGETS) and all(t["met"] in (True, False) for t in targets.values())


def test_host_ops_compute_what_pytorch_computes():
    """Each host-suite pair computes the same values, so a ratio compares like with like."""
    import aimv2_kernels as ak
    from benchmarks import host

    for op in host.host_ops():
        inputs, _ = op.make(torch.device("cpu"))
        with ak.use_backend("torch"):
            ours = op.ours(*inputs)
        theirs = op.theirs(*inputs)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), theirs if isinstance(theirs, tuple) else (theirs,)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=op.name)


def test_graph_ms_is_none_on_a_cpu_and_when_capture_fails(monkeypatch):
    import triton.testing

    from benchmarks.harness import graph_ms

    assert graph_ms(lambda: None, torch.device("cpu")) is None
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: 0.25)
    assert graph_ms(lambda: None, torch.device("cuda")) == 0.25

    def not_capturable(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", not_capturable)
    assert graph_ms(lambda: None, torch.device("cuda")) is None


def test_byte_counter_counts_writes_once_per_op_and_no_views():
    import aimv2_kernels as ak
    from benchmarks.data_movement import ByteCounter

    x = torch.randn(4, 8)
    with ak.use_backend("torch"), ByteCounter() as counter:
        x.t()  # a view: nothing written
        x.to(torch.bfloat16)  # a cast: 4 * 8 * 2 bytes of data movement
        ak.swiglu(x, x)  # our op, counted once whatever its body runs
    assert "t" not in counter.calls and counter.bytes["_to_copy"] == 64
    assert counter.calls["aimv2_kernels.swiglu.default"] == 1 and counter.movement() == 64
    assert set(counter.calls) == {"_to_copy", "aimv2_kernels.swiglu.default"}


def test_data_movement_report_on_the_tiny_preset():
    from benchmarks.data_movement import report

    text = report("tiny", 2)
    assert "data movement:" in text and "MiB per sample" in text and "operators per encoder block" in text


def test_attention_rows_record_the_configs_their_kernels_ran_with():
    from benchmarks.attention import attach_configs

    def row(kernel, bucket, prefix, config, D=128):
        key = {"S_BUCKET": bucket, "HAS_PREFIX": prefix}
        return {"kernel": kernel, "head_dim": D, "key": key, "config": config}

    picked = [row("dq", 256, True, "128x64 w8 s2"), row("bwd", 256, True, "128x128 w8 s2"),
              row("fwd", 256, True, "128x128 w8 s3"), row("dkdv", 256, True, "64x128 w8 s2"),
              row("fwd", 512, False, "64x64 w4 s3"),  # the decoder's
              row("fwd", 256, True, "64x64 w4 s2", D=64)]
    deterministic = "ours-triton" + P.DETERMINISTIC_SUFFIX
    results = [Result("attention", "prefix_attention", mode, "B128 H8 S256 D128", 256, provider, True, True, ms=1.0)
               for mode in (FWD, FWD_BWD) for provider in ("ours-triton", deterministic, "flex")]
    results[1].ms = None  # the deterministic provider skips the forward-only mode
    attach_configs(results, picked, lambda S: 1 << max(S - 1, 0).bit_length())
    fwd, det_fwd, flex, both, det_both, _ = results
    assert fwd.extra["triton configs"] == "fwd 128x128 w8 s3"
    assert both.extra["triton configs"] == "fwd 128x128 w8 s3; bwd 128x128 w8 s2"
    assert det_both.extra["triton configs"] == "fwd 128x128 w8 s3; dkdv 64x128 w8 s2; dq 128x64 w8 s2"
    assert "triton configs" not in flex.extra and "triton configs" not in det_fwd.extra


# ---- the deterministic backward ---------------------------------------------------------------------

class _RecordSwitch(torch.autograd.Function):
    """Identity that records AIMV2_KERNELS_DETERMINISTIC in its forward and its backward."""

    seen: list[tuple[str, object]] = []

    @staticmethod
    def forward(ctx, x):
        _RecordSwitch.seen.append(("forward", os.environ.get(P.DETERMINISTIC_ENV)))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _RecordSwitch.seen.append(("backward", os.environ.get(P.DETERMINISTIC_ENV)))
        return grad


def _switch_case(mode):
    return Case("attention", "prefix_attention", mode, "s", 1, lambda grad: (torch.randn(8, requires_grad=grad),),
                lambda _p: 1.0, "GB/s")


@pytest.mark.parametrize("before", [None, "0"])
def test_deterministic_provider_sets_the_switch_for_its_calls_and_backward_then_restores_it(monkeypatch, before):
    if before is None:
        monkeypatch.delenv(P.DETERMINISTIC_ENV, raising=False)
    else:
        monkeypatch.setenv(P.DETERMINISTIC_ENV, before)
    cpu = Context(torch.device("cpu"), quick=True, card=Card("test", 1.0, 1.0, 0.0))
    base = Provider("ours-triton", P.call_with(_RecordSwitch.apply), ours=True, mask="prefix")
    det = P.deterministic(base)
    assert (det.name, det.ours, det.mask, det.backend) == ("ours-triton deterministic", True, "prefix", None)
    _RecordSwitch.seen.clear()
    assert run_case(cpu, _switch_case(FWD_BWD), det).ms > 0
    assert set(_RecordSwitch.seen) == {("forward", "1"), ("backward", "1")}
    assert os.environ.get(P.DETERMINISTIC_ENV) == before
    _RecordSwitch.seen.clear()
    assert run_case(cpu, _switch_case(FWD_BWD), base).ms > 0  # the default provider leaves it alone
    assert set(_RecordSwitch.seen) == {("forward", before), ("backward", before)}

    def failing(x):
        raise RuntimeError("boom")
    failed = run_case(cpu, _switch_case(FWD_BWD), P.deterministic(Provider("ours-triton", P.call_with(failing))))
    assert failed.note == "failed: RuntimeError: boom" and os.environ.get(P.DETERMINISTIC_ENV) == before
    skipped = run_case(cpu, _switch_case(FWD), det)
    assert skipped.ms is None and skipped.note == "skipped: same forward as ours-triton"


@pytest.mark.parametrize("suite", [attention, varlen])
def test_attention_suites_time_the_deterministic_backward_beside_the_default(suite):
    for ctx in (_gpu_context(), Context(torch.device("cpu"), quick=True, card=Card("test", 1.0, 1.0, 0.0))):
        by_name = {p.name: p for p in suite.providers(ctx)}
        default, det = by_name["ours-triton"], by_name["ours-triton deterministic"]
        assert det.env == {P.DETERMINISTIC_ENV: "1"} and default.env == {}
        assert (det.ours, det.backend, det.mask, det.skip) == (True, "triton", "prefix", default.skip)
        assert det.skip_reason(FWD) and det.skip_reason(FWD_BWD) == default.skip


def test_auto_table_leaves_the_deterministic_rows_out():
    from benchmarks.auto_table import choices

    rows = [Result("attention", "prefix_attention", FWD_BWD, "s", 1, name, True, True, ms=ms, dtype="bfloat16",
                   elements=1 << 25)
            for name, ms in (("ours-triton", 2.0), ("ours-cuda", 3.0), ("ours-triton deterministic", 1.0))]
    picked = choices(rows, cuda_tests="passed")
    assert [r["backend"] for r in picked] == ["triton"] and set(picked[0]["ms"]) == {"ours-triton", "ours-cuda"}
