"""aimv2-probe: probes learn from features, data splits, the metrics, table and files it reports, and
the command line end to end."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import KINDS
from aimv2.probe import build_parser, builtin_split, folder_split, main, run_probe, train_probe
from aimv2.probe_report import default_out_dir, format_table, output_paths, probe_metrics
from aimv2.train import train
from aimv2.train_config import TrainConfig


@pytest.mark.parametrize("kind", ["attentive", "linear"])
def test_probe_learns_a_separable_signal(kind):
    """Class c shifts the patch features along direction c (hidden in unit noise): both probes must find it."""
    g = torch.Generator().manual_seed(0)
    def make(n):
        labels = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 9, 16, generator=g)
        x[torch.arange(n), :, labels] += 1.5
        return x, labels
    train_x, train_y = make(300)
    test_x, test_y = make(200)
    top1 = train_probe(kind, train_x, train_y, test_x, test_y, 3, steps=150, batch_size=64, lr=3e-3, seed=0, device=torch.device("cpu"))
    assert top1 > 0.9


def test_builtin_split_labels_are_shape_kinds():
    train_x, train_y, test_x, test_y, classes = builtin_split(16, 20, 10)
    assert train_x.shape == (20, 3, 16, 16) and test_x.shape == (10, 3, 16, 16)
    assert classes[0] == "circle" and int(train_y.max()) < len(classes)


def _folder(root, per_class=5):
    for name, colour in (("reds", (200, 30, 30)), ("blues", (30, 30, 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = np.random.default_rng(i).integers(0, 40, (20, 24, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    (root / "reds" / "broken.png").write_bytes(b"not a png")


def test_folder_split_holds_out_every_fifth_and_skips_unreadable(tmp_path, capsys):
    _folder(tmp_path)
    train_x, train_y, test_x, test_y, classes = folder_split(str(tmp_path), 16)
    assert classes == ["blues", "reds"] and len(test_x) == 2 and len(train_x) == 8  # broken.png skipped
    assert "skipped 1 unreadable" in capsys.readouterr().err


# classes a..d; d has no test image and is never predicted
HAND_LABELS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
HAND_PREDICTIONS = [0, 0, 1, 2, 1, 1, 2, 2, 0, 1]


def test_metrics_on_a_hand_made_example():
    m = probe_metrics(torch.tensor(HAND_LABELS), torch.tensor(HAND_PREDICTIONS), ["a", "b", "c", "d"])
    assert m["confusion"] == [[2, 1, 1, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]
    assert [c["support"] for c in m["per_class"]] == [4, 2, 4, 0]
    assert [c["recall"] for c in m["per_class"]] == [0.5, 1.0, 0.5, None]  # per-class accuracy
    assert [c["precision"] for c in m["per_class"]] == [2 / 3, 0.5, 2 / 3, None]
    assert m["top1"] == 0.6 and m["correct"] == 6 and m["total"] == 10
    assert m["balanced_accuracy"] == 2 / 3  # mean recall over a, b, c; d has no support
    with pytest.raises(ValueError):
        probe_metrics([0, 1], [0], ["a", "b"])
    with pytest.raises(ValueError):
        probe_metrics([0, 2], [0, 1], ["a", "b"])


def test_table_has_a_row_per_class_and_the_overall_lines():
    classes = ["a", "b", "c", "dodecahedron"]
    results = {"trained": probe_metrics(HAND_LABELS, HAND_PREDICTIONS, classes),
               "random": probe_metrics(HAND_LABELS, [0] * 10, classes)}
    lines = format_table(results).splitlines()
    assert "trained" in lines[0] and "random" in lines[0]
    assert lines[1].split() == ["class", "support"] + ["recall", "precision"] * 2
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("-")}
    assert rows["a"] == ["4", "50.0%", "66.7%", "100.0%", "40.0%"]
    assert rows["b"] == ["2", "100.0%", "50.0%", "0.0%", "-"]
    assert rows["dodecahedron"] == ["0", "-", "-", "-", "-"]
    assert rows["top-1"] == ["10", "60.0%", "40.0%"]
    assert [line for line in lines if line.startswith("balanced acc.")][0].split()[2:] == ["66.7%", "33.3%"]
    assert len({line.index("%") for line in lines if line.startswith(("a ", "b ", "c "))}) == 1  # aligned


def test_default_output_place(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    step = str(run / "checkpoints" / "step_00000002.pt")
    assert default_out_dir(str(run)) == str(run)
    assert default_out_dir(step) == str(run)
    assert default_out_dir(str(tmp_path / "loose.pt")) == "." and default_out_dir(None) == "."
    assert output_paths(None, step) == (str(run / "probe_confusion.png"), str(run / "probe.json"))
    assert output_paths("out", step) == (os.path.join("out", "probe_confusion.png"), os.path.join("out", "probe.json"))
    assert output_paths("figs/p.png", None) == ("figs/p.png", "figs/p.json")


def _is_png(path):
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100


def test_cli_on_an_image_folder_and_on_a_checkpoint(tmp_path, capsys, monkeypatch):
    _folder(tmp_path / "images", per_class=10)
    monkeypatch.chdir(tmp_path)  # no --checkpoint: the picture and probe.json go to the current directory
    assert main(["--data", str(tmp_path / "images"), "--steps", "30", "--probe", "linear"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "blues" in out and "reds" in out
    assert _is_png(tmp_path / "probe_confusion.png")
    assert json.loads((tmp_path / "probe.json").read_text())["classes"] == ["blues", "reds"]

    run = tmp_path / "run"
    # the trainer's own held-out scoring and pictures are not what is tested here: off where the trainer has them
    quiet = {k: 0 for k in ("eval_samples", "prediction_images") if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    train(TrainConfig(steps=2, batch_size=4, workers=0, progress=False, out=str(run), max_text_len=16,
                      model={"enc_depth": 1, "dec_depth": 1}, backend="torch", **quiet))
    result = run_probe(build_parser().parse_args(
        ["--checkpoint", str(run), "--train-size", "40", "--test-size", "20", "--steps", "10", "--compare-random"]))
    out = capsys.readouterr().out
    assert "step 2" in out and "randomly initialized" in out and "margin over the random encoder" in out
    table = out.splitlines()
    for kind in KINDS:
        assert any(line.split()[:2] == [kind, str(result["report"]["encoders"][0]["per_class"][KINDS.index(kind)]["support"])]
                   for line in table)
    assert any(line.startswith("top-1 ") and line.split()[1] == "20" for line in table)
    assert any(line.startswith("balanced acc.") for line in table)

    # written into the run directory, atomically (no temporary file left), and the JSON is what run_probe returned
    assert result["png"] == str(run / "probe_confusion.png") and _is_png(result["png"])
    assert not [f for f in os.listdir(run) if f.startswith(".")]
    report = json.loads((run / "probe.json").read_text())
    assert report == result["report"]
    trained, random_ = report["encoders"]
    assert (trained["label"], random_["label"]) == ("trained", "random")
    assert report["step"] == 2 and report["probe"] == "attentive" and report["images"] == {"train": 40, "test": 20}
    assert result[trained["description"]] == trained["top1"] and result[random_["description"]] == random_["top1"]
    assert report["margin"] == trained["top1"] - random_["top1"]
    for entry in (trained, random_):
        confusion = torch.tensor(entry["confusion"])
        assert confusion.sum() == 20 and confusion.trace() == entry["correct"] == round(entry["top1"] * 20)
        assert [c["support"] for c in entry["per_class"]] == confusion.sum(1).tolist()

    # --out: a checkpoint file, the picture named explicitly, the JSON beside it
    step_file = str(run / "checkpoints" / "step_00000002.pt")
    assert main(["--checkpoint", step_file, "--train-size", "20", "--test-size", "10", "--steps", "5",
                 "--probe", "linear", "--out", str(tmp_path / "figs" / "p.png")]) == 0
    assert _is_png(tmp_path / "figs" / "p.png")
    assert json.loads((tmp_path / "figs" / "p.json").read_text())["checkpoint"] == step_file
    assert main(["--checkpoint", str(tmp_path / "nowhere")]) == 1
