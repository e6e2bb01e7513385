"""aimv2-probe: probes learn from features, data splits, and the command line end to end."""
import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.probe import builtin_split, folder_split, main, train_probe
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


def test_cli_on_an_image_folder_and_on_a_checkpoint(tmp_path, capsys):
    _folder(tmp_path / "images", per_class=10)
    assert main(["--data", str(tmp_path / "images"), "--steps", "30", "--probe", "linear"]) == 0
    assert "top-1" in capsys.readouterr().out

    run = tmp_path / "run"
    train(TrainConfig(steps=2, batch_size=4, workers=0, progress=False, out=str(run), max_text_len=16,
                      model={"enc_depth": 1, "dec_depth": 1}, backend="torch"))
    assert main(["--checkpoint", str(run), "--train-size", "40", "--test-size", "20", "--steps", "10", "--compare-random"]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "randomly initialized" in out and "margin over the random encoder" in out
    assert main(["--checkpoint", str(tmp_path / "nowhere")]) == 1
