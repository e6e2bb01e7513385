"""scripts/gpu_check.sh and its helpers, without a GPU: the plan fits the budget, stages narrow as
asked, outcomes survive a killed pytest, and a run's tables land in benchmarks/RESULTS.md.

The whole staged run is exercised by `bash scripts/gpu_check.sh --cpu-smoke OUTDIR` in CI."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
append_results = _load("append_results")


def test_plan_lists_every_stage_within_the_budget():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--plan"], capture_output=True, text=True,
                         check=True).stdout
    stages = [line.split()[:3] for line in out.splitlines() if line.startswith("stage ")]
    assert [s[1] for s in stages] == ["env", "tests", "sanitizer", "bench-attention", "bench-loss", "bench-norm",
                                      "bench-step"]
    assert sum(int(s[2]) for s in stages) <= 420


def test_only_and_suite_narrow_the_stages_but_env_always_runs():
    names = lambda stages: [s.name for s in stages]  # noqa: E731
    assert names(gpu_check.select_stages(["tests"], [])) == ["env", "tests"]
    assert names(gpu_check.select_stages(["bench"], [])) == ["env", "bench-attention", "bench-loss", "bench-norm",
                                                             "bench-step"]
    assert names(gpu_check.select_stages([], ["swiglu"])) == ["env", "bench-norm"]
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check.select_stages(["benchmarks"], [])


def test_outcomes_are_read_from_verbose_lines_when_pytest_was_killed():
    output = "\n".join([
        "tests/test_a.py::test_one[bf16-67] PASSED                                [ 10%]",
        "[gw2] [ 20%] FAILED tests/test_b.py::test_two[fwd-128x64-w8-s2]",
        "[gw0] [ 30%] SKIPPED tests/test_c.py::test_three",
        "some other line that mentions PASSED without a test id",
    ])
    cases = gpu_check._verbose_cases(output)
    assert [(c["test"], c["outcome"]) for c in cases] == [
        ("tests/test_a.py::test_one[bf16-67]", "passed"),
        ("tests/test_b.py::test_two[fwd-128x64-w8-s2]", "failed"),
        ("tests/test_c.py::test_three", "skipped"),
    ]


def test_a_stage_past_its_deadline_is_killed_and_reported(tmp_path):
    runner = gpu_check.Runner(tmp_path, {"PATH": "/usr/bin:/bin"})
    import time

    outcome = runner.run(["bash", "-c", "echo started; sleep 30"], deadline=time.time() + 2)
    assert outcome.timed_out and outcome.seconds < 10
    assert "started" in (tmp_path / "log.txt").read_text()


def _fake_run(tmp_path: Path, mode: str = "gpu") -> Path:
    run = {"run": {"started": "2026-11-30T02:00:00Z", "mode": mode, "command": "bash scripts/gpu_check.sh /out",
                   "commit": "abc1234", "stages": ["env", "tests"], "budget_s": 210},
           "stages": [{"name": "env", "status": "passed", "seconds": 50.0, "budget_s": 95,
                       "env": {"card": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
                               "python": "3.12.3"}, "card": {"copy_gbps": 4300, "matmul_tflops": 780.0}},
                      {"name": "tests", "status": "failed", "seconds": 100.0, "budget_s": 115,
                       "counts": "1 failed, 9 passed"}],
           "tests": [{"test": "tests/test_x.py::test_y", "outcome": "failed", "seconds": 1.0,
                      "message": "AssertionError: max abs error 0.5 > 0.01\nmore"}],
           "records": [], "targets": []}
    (tmp_path / "results.json").write_text(json.dumps(run))
    (tmp_path / "results.md").write_text("## 2026-11-30 on NVIDIA H200\n\n### attention (40 s)\n\n| a |\n")
    return tmp_path


def test_append_results_inserts_the_run_after_the_intro(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Benchmark results\n\nintro\n\n## Older run\n\nold table\n")
    assert append_results.main([str(_fake_run(tmp_path)), "--results", str(page)]) == 0
    text = page.read_text()
    assert text.index("NVIDIA H200 (gpu_check at abc1234)") < text.index("## Older run")
    assert text.startswith("# Benchmark results\n\nintro\n")
    assert "copy 4300 GB/s, bf16 matmul 780.0 TFLOP/s" in text
    assert "| tests | failed | 100 of 115 | 1 failed, 9 passed |" in text
    assert "`tests/test_x.py::test_y` x1: AssertionError: max abs error 0.5 > 0.01" in text
    assert "#### attention (40 s)" in text


def test_append_results_refuses_a_cpu_smoke_run(tmp_path):
    page = tmp_path / "RESULTS.md"
    page.write_text("# Benchmark results\n")
    assert append_results.main([str(_fake_run(tmp_path, mode="cpu-smoke")), "--results", str(page)]) == 2
    assert page.read_text() == "# Benchmark results\n"


def test_failures_are_recorded_as_they_happen(tmp_path):
    """tests/conftest.py writes each failure with its message at once, so a killed stage keeps them."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_logreport  # noqa: F401\n")
    (tmp_path / "test_planted.py").write_text(
        "def test_ok():\n    pass\n\n\ndef test_wrong_row():\n    err = 0.5\n    assert err <= 1e-2, f'row 3: max abs error {err}'\n")
    events = tmp_path / "events.jsonl"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "AIMV2_TEST_EVENTS": str(events)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], env=env,
                   cwd=tmp_path, capture_output=True, text=True)
    messages = gpu_check._failure_events(events)
    assert list(messages) == ["test_planted.py::test_wrong_row"]
    assert "row 3: max abs error 0.5" in messages["test_planted.py::test_wrong_row"]
