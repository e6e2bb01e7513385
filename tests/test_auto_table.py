"""Backend "auto" follows a card's measured table: the writer (benchmarks/auto_table.py) picks per
(op, dtype, size class) the backend with the least total time, keeps CUDA C++ out unless its tests
passed, and the registry reads the row for the call's first tensor (aimv2_kernels/auto_table.py)."""
import json

import pytest
import torch

from aimv2_kernels import auto_table, backend
from benchmarks import auto_table as writer
from benchmarks.harness import FWD, FWD_BWD, Result

CARD = "Test Card 80GB"


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(auto_table.TABLE_DIR_ENV, str(tmp_path))
    auto_table.clear_cache()
    backend._resolved.clear()
    backend._card_tables.clear()
    yield tmp_path
    auto_table.clear_cache()
    backend._resolved.clear()
    backend._card_tables.clear()


def _result(suite, provider, ms, size="a", mode=FWD_BWD, elements=1 << 25, dtype="bfloat16"):
    return Result(suite, suite, mode, size, 0.0, provider, provider.startswith("ours-"), True, ms=ms,
                  dtype=dtype, elements=elements)


def test_size_classes_and_names():
    assert [auto_table.size_class(n) for n in (1, (1 << 20) - 1, 1 << 20, (1 << 24) - 1, 1 << 24)] == [
        "small", "small", "medium", "medium", "large"]
    assert auto_table.card_slug("NVIDIA H200") == "nvidia_h200"
    assert auto_table.op_of("rms_norm_bwd") == "rms_norm" and auto_table.op_of("linear_ce") == "linear_ce"


def test_writer_picks_the_least_total_time_over_the_cases_of_a_class():
    results = [
        _result("norm", "ours-triton", 1.0, size="a"), _result("norm", "ours-cuda", 0.5, size="a"),
        _result("norm", "ours-triton", 1.0, size="b"), _result("norm", "ours-cuda", 2.0, size="b"),  # cuda 2.5 > 2.0
        _result("norm", "eager", 0.1, size="a"),  # not ours: never a choice
        _result("norm", "ours-cuda", 0.01, size="a", mode=FWD),  # fwd ignored where fwd+bwd exists
        _result("swiglu", "ours-triton", 3.0, elements=100), _result("swiglu", "ours-cuda", 1.0, elements=100),
        _result("loss", "ours-cuda", 0.1), _result("loss", "ours-triton", 1.0),  # loss: not in the table
    ]
    rows = writer.choices(results, cuda_tests="passed")
    picked = {(r["op"], r["size_class"]): r["backend"] for r in rows}
    assert picked == {("rms_norm", "large"): "triton", ("swiglu", "small"): "cuda"}
    assert rows[0]["ms"] == {"ours-cuda": 2.5, "ours-triton": 2.0} and rows[0]["cases"] == 2


def test_cuda_stays_out_unless_its_tests_passed():
    results = [_result("norm", "ours-triton", 1.0), _result("norm", "ours-cuda", 0.5)]
    assert {r["backend"] for r in writer.choices(results, cuda_tests="failed: 1 failed")} == {"triton"}
    assert {r["backend"] for r in writer.choices(results, cuda_tests="passed")} == {"cuda"}


def test_a_backend_missing_a_case_of_the_class_does_not_compete():
    results = [_result("norm", "ours-triton", 1.0, size="a"), _result("norm", "ours-triton", 1.0, size="b"),
               _result("norm", "ours-cuda", 0.1, size="a")]  # cuda failed on b
    assert [r["backend"] for r in writer.choices(results, cuda_tests="passed")] == ["triton"]


def test_written_table_is_what_the_lookup_reads(table_dir):
    rows = writer.choices([_result("attention", "ours-triton", 2.0), _result("attention", "ours-cuda", 1.0)], "passed")
    path = writer.write(CARD, {"commit": "abc", "torch": "2.x"}, rows, "passed")
    assert path == table_dir / "test_card_80gb.json"
    table = json.loads(path.read_text())
    assert table["card"] == CARD and table["measured"]["commit"] == "abc" and table["cuda_tests"] == "passed"
    assert auto_table.measured_choice("attention_fwd", CARD, "bfloat16", 1 << 25) == "cuda"
    assert auto_table.measured_choice("attention_bwd", CARD, "bfloat16", 1 << 25) == "cuda"
    assert auto_table.measured_choice("attention_fwd", CARD, "float16", 1 << 25) is None  # no row
    assert auto_table.measured_choice("attention_fwd", CARD, "bfloat16", 100) is None  # another class
    assert auto_table.measured_choice("attention_fwd", "Other Card", "bfloat16", 1 << 25) is None  # no table


def test_auto_on_a_cuda_device_follows_the_table_then_the_fixed_order(table_dir, monkeypatch):
    """The registry's choice for a CUDA call, without a GPU: the card's name, availability and a
    "cuda" implementation stand in."""
    writer.write(CARD, {}, [{"op": "rms_norm", "dtype": "float32", "size_class": "small", "backend": "cuda"}], "passed")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARD)
    monkeypatch.setattr(backend, "unavailable_reason", lambda name: None)
    fake_cuda = object()
    monkeypatch.setitem(backend._REGISTRY, "rms_norm_fwd", dict(backend._REGISTRY["rms_norm_fwd"], cuda=fake_cuda))
    monkeypatch.setitem(backend._REGISTRY["rms_norm_fwd"], "triton", object())
    cuda = torch.device("cuda", 0)
    small, large = torch.empty(8, 8), torch.empty(1, 1).expand(1 << 12, 1 << 12)  # 64 and 2^24 elements
    with backend.use_backend("auto"):
        assert backend.resolve("rms_norm_fwd", cuda, small) == ("cuda", fake_cuda)  # the table's row
        assert backend.resolve("rms_norm_fwd", cuda, large)[0] == "triton"  # no row: the fixed order
        assert backend.resolve("rms_norm_fwd", cuda)[0] == "triton"  # no example: the fixed order
        assert backend.resolve("rms_norm_fwd", cuda, small.double())[0] == "triton"  # another dtype
    with backend.use_backend("triton"):
        assert backend.resolve("rms_norm_fwd", cuda, small)[0] == "triton"  # an explicit choice wins


def test_write_auto_table_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the flag runs the suites")
    from benchmarks.__main__ import main

    assert main(["--write-auto-table"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--write-auto-table needs a CUDA GPU" in err
