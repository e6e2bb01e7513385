"""Every command answers a user's mistake with one line on stderr and an exit status (2: a bad
argument, 1: a failure while running), never a traceback; --debug or AIMV2_DEBUG=1 shows it."""
import json
import os
import subprocess
import sys

import pytest

from aimv2 import export, plot, probe, train
from aimv2.cli import DEBUG_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def _status(main, argv) -> int:
    """The exit status of main(argv), whether it returns it or the parser exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line(capsys, *words) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, flag", [
    (["--preset", "hugee"], "--preset 'hugee'"),
    (["--steps", "-3"], "--steps"),
    (["--model", "foo=1"], "--model foo=1"),
    (["--model", "enc_dim=65"], "--model enc_dim=65"),
    (["--lr", "0"], "--lr"),
    (["--config", "nowhere.yaml"], "--config"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_train_bad_option_is_one_line_and_status_2(argv, flag, capsys, tmp_path):
    assert _status(train.main, [*argv, "--out", str(tmp_path / "run")]) == 2
    _one_line(capsys, "aimv2-train: error:", flag)
    assert not (tmp_path / "run").exists()


def test_train_missing_data_is_one_line_and_status_1_before_anything_is_written(capsys, tmp_path):
    assert _status(train.main, ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 1
    _one_line(capsys, "aimv2-train:", "--data", "nowhere", "does not exist")
    assert not (tmp_path / "run").exists()


def test_train_broken_data_names_the_files_and_the_samples_tried(capsys, tmp_path):
    """Every image missing: the loader worker gives up after 32 samples in a row; the training
    process ends with one line naming the JSONL, the image files and the count, status 1."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"image": f"img{i}.png", "caption": "a cat"}) + "\n" for i in range(40)))
    argv = ["--data", str(data), "--steps", "1", "--batch-size", "4", "--workers", "1", "--eval-samples", "0",
            "--prediction-images", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert _status(train.main, argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aimv2-train: the data looks broken: 32 consecutive samples"), last
    assert str(data) in last and "img" in last and "FileNotFoundError" in last


def test_train_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError):  # the flag does the same
        monkeypatch.delenv(DEBUG_ENV)
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--debug"])


def test_train_console_process_prints_one_line(tmp_path):
    """The whole command as a process (passive-OpenMP restart included): one line, status 2."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "aimv2.train", "--preset", "hugee", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "--preset 'hugee'" in done.stderr


@pytest.mark.parametrize("argv, status, words", [
    (["--preset", "hugee"], 2, ["aimv2-probe: error:", "--preset 'hugee'"]),
    (["--steps", "0"], 2, ["--steps"]),
    (["--probe", "bogus"], 2, ["--probe"]),
    (["--device", "gpu"], 2, ["--device 'gpu'"]),
    (["--checkpoint", "nowhere.pt"], 1, ["aimv2-probe:", "nowhere.pt"]),
])
def test_probe_bad_input_is_one_line(argv, status, words, capsys, tmp_path):
    assert _status(probe.main, [*argv, "--out", str(tmp_path)]) == status
    _one_line(capsys, *words)


def test_plot_bad_input_is_one_line(capsys, tmp_path):
    assert _status(plot.main, [str(tmp_path / "nowhere")]) == 1
    _one_line(capsys, "aimv2-plot:", "nowhere")
    assert _status(plot.main, []) == 2
    _one_line(capsys, "aimv2-plot: error:", "DIR")


def test_export_bad_input_is_one_line(capsys, tmp_path):
    assert _status(export.main, [str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 1
    _one_line(capsys, "aimv2-export:", "missing.pt")
    assert _status(export.main, [str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--dtype", "int8"]) == 2
    _one_line(capsys, "aimv2-export: error:", "--dtype")


@pytest.mark.parametrize("argv, flag", [(["--suite", "nope"], "--suite"), (["--bogus"], "--bogus")])
def test_benchmarks_bad_option_is_one_line_and_status_2(argv, flag, capsys):
    from benchmarks.__main__ import main

    assert _status(main, argv) == 2
    _one_line(capsys, "python -m benchmarks: error:", flag)
