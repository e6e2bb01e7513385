"""aimv2-train options: defaults, config files, flags and their precedence; optimizer groups and
schedule; metrics and plotting."""
import json
import os

import pytest
import torch

from aimv2 import AIMv2Config, AIMv2Model
from aimv2.metrics import MetricsLog, read_metrics
from aimv2.optim import WarmupCosine, build_optimizer, no_decay_names
from aimv2.plot import main as plot_main
from aimv2.train_config import TrainConfig, merge_for_resume, parse_args


def test_defaults_without_arguments():
    cfg = parse_args([])
    assert cfg.preset == "tiny" and cfg.data == "builtin" and cfg.out_dir == os.path.join("runs", "aimv2-tiny")
    assert cfg.explicit == () and cfg.resume is None and cfg.progress and cfg.betas == (0.9, 0.95)
    assert parse_args(["--blank-images"]).out_dir == os.path.join("runs", "aimv2-tiny-blank")


def test_flags_override_the_config_file(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 50\nbatch-size: 16\nlr: 0.01\nmodel:\n  enc_depth: 2\n")
    cfg = parse_args(["--config", str(yaml_file), "--lr", "0.002", "--model", "dec_depth=1", "--no-progress",
                      "--betas", "0.8", "0.9", "--backend", "torch", "--warmup-steps", "none"])
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (50, 16, 0.002)
    assert cfg.model == {"enc_depth": 2, "dec_depth": 1} and cfg.progress is False and cfg.betas == (0.8, 0.9)
    assert cfg.backend == "torch" and cfg.warmup_steps is None and cfg.warmup == 2
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"steps": 7, "grad_accum": 2}))
    assert (parse_args(["--config", str(json_file)]).steps, parse_args(["--config", str(json_file)]).grad_accum) == (7, 2)


def test_resume_flag_and_merge_keeps_the_stored_options():
    assert parse_args(["--resume"]).resume == "latest"
    assert parse_args(["--resume", "ck.pt"]).resume == "ck.pt"
    saved = TrainConfig(steps=500, lr=0.005, batch_size=64).to_dict()
    merged = merge_for_resume(saved, parse_args(["--resume", "--steps", "800"]))
    assert (merged.steps, merged.lr, merged.batch_size, merged.resume) == (800, 0.005, 64, "latest")


def test_deterministic_flag_and_resume_keeps_the_stored_one():
    assert parse_args([]).deterministic is False
    assert parse_args(["--deterministic"]).deterministic is True
    assert parse_args(["--deterministic", "--no-deterministic"]).deterministic is False
    saved = TrainConfig(deterministic=True).to_dict()
    assert merge_for_resume(saved, parse_args(["--resume"])).deterministic is True
    assert merge_for_resume(saved, parse_args(["--resume", "--no-deterministic"])).deterministic is False


def test_bad_options_are_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    assert "steps must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model", "no-equals-sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(SystemExit) as stop:  # one line and status 2, like the flags (tests/test_cli.py)
        parse_args(["--config", str(bad)])
    assert stop.value.code == 2 and "unknown option(s) ['stepz']" in capsys.readouterr().err


def test_weight_decay_groups():
    model = AIMv2Model(AIMv2Config.preset("tiny", enc_depth=1, dec_depth=1))
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    for name in ("encoder.pos_embed", "decoder.pos_embed", "decoder.bos", "decoder.token_embed.weight",
                 "encoder.patch_embed.bias", "encoder.norm.weight", "decoder.image_proj.bias"):
        assert name in names and name in skip, name
    for name in ("encoder.patch_embed.weight", "decoder.pixel_head.weight", "decoder.text_head.weight", "decoder.image_proj.weight"):
        assert name in names and name not in skip, name
    assert all(p.ndim >= 2 for n, p in names.items() if n not in skip)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]  # CPU parameters


def test_adamw_is_fused_for_cuda_parameters(monkeypatch):
    """Plain CUDA parameters get the fused AdamW, anything else the multi-tensor one (decided from the
    parameters alone, so a CPU machine can check it by posing as CUDA)."""
    from aimv2 import optim

    model = torch.nn.Linear(4, 4)
    assert optim.update_kind(model) == {"foreach": True}
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert optim.update_kind(model) == {"fused": True}


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.55) and f(20) == pytest.approx(0.1) and f(30) == pytest.approx(0.1)
    values = [f(s) for s in range(3, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_metrics_log_resume_cuts_back_and_plot(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for step in range(1, 8):
        log.write({"step": step, "loss": 2.0 / step, "pixel_loss": 1.0 / step, "text_loss": 1.6 / step, "lr": 1e-3, "nan": float("nan")})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # a torn last line from a killed run
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8)) and read_metrics(path)[0]["nan"] is None
    MetricsLog(path, resume_step=4).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text(open(path).read())
    assert plot_main([str(tmp_path), str(other), "--output", str(tmp_path / "both.png")]) == 0
    assert os.path.getsize(tmp_path / "both.png") > 1000
    assert plot_main([str(tmp_path / "empty")]) == 1
