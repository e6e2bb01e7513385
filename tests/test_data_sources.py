"""Tar shards and JSONL sources: reading, and corrupt samples skipped and counted, never fatal."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import BatchKeys, ByteTokenizer, CaptionDataset, JsonlCaptions, SampleOrder, TarShards, TrainTransform, make_loader, open_source


def _png(seed: int, size=(40, 30)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, samples):
    """samples: list of (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                _add(tar, f"{key}.{ext}", data)


@pytest.fixture
def shards(tmp_path):
    good = [(f"s{i:03d}", {"png": _png(i), "txt": f"caption {i}".encode()}) for i in range(4)]
    corrupt = ("s900", {"jpg": b"\xff\xd8 definitely not a jpeg", "txt": b"broken image"})
    no_caption = ("s901", {"png": _png(9)})
    json_caption = ("s902", {"png": _png(10), "json": json.dumps({"caption": "from json"}).encode()})
    _write_shard(tmp_path / "a.tar", good[:2] + [corrupt])
    _write_shard(tmp_path / "b.tar", good[2:] + [no_caption, json_caption])
    return tmp_path


def test_tar_shards_index_and_read(shards):
    source = TarShards(str(shards))
    assert len(source.shards) == 2 and len(source) == 6  # the caption-less sample is left out
    assert source.index_errors == 1
    captions = set()
    for i in range(len(source)):
        try:
            image, caption = source.load(i)
        except Exception:
            continue
        assert image.mode == "RGB" and image.size == (40, 30)
        captions.add(caption)
    assert captions == {"caption 0", "caption 1", "caption 2", "caption 3", "from json"}
    assert open_source(str(shards / "a.tar"), 16).describe().startswith("3 samples")


def test_corrupt_shard_sample_is_skipped_and_counted(shards):
    source = TarShards(str(shards))
    dataset = CaptionDataset(source, ByteTokenizer(), 16, TrainTransform(16), seed=0)
    keys = BatchKeys(SampleOrder(len(source), seed=0, shuffle=False), 6)
    batch = next(iter(make_loader(dataset, keys)))
    # one full epoch in order: the corrupt sample is replaced by the next one and counted
    assert batch["image"].shape == (6, 3, 16, 16) and batch["skipped"] == 1
    assert torch.isfinite(batch["image"]).all()


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path):
    _write_shard(tmp_path / "t.tar", [(f"k{i}", {"png": _png(i, (300, 300)), "txt": b"x"}) for i in range(3)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="damaged"):
        source = TarShards(str(tmp_path / "t.tar"))
    assert 1 <= len(source) < 3 and source.index_errors >= 1


def test_jsonl_source_skips_bad_lines_and_unreadable_images(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    lines = [json.dumps({"image": f"img/{i}.png", "caption": f"photo {i}"}) for i in range(3)]
    lines += [json.dumps({"image": "img/bad.png", "text": "bad"}), "{not json", json.dumps({"caption": "no image"}),
              json.dumps({"image": "img/missing.png", "caption": "gone"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    source = JsonlCaptions(str(path))
    assert len(source) == 5 and source.index_errors == 2
    assert source.load(1)[1] == "photo 1"
    dataset = CaptionDataset(source, ByteTokenizer(), 16, TrainTransform(16), seed=0)
    keys = BatchKeys(SampleOrder(len(source), seed=0, shuffle=False), 5)
    batch = next(iter(make_loader(dataset, keys)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["skipped"] == 3  # index 3 tries bad.png and missing.png, index 4 missing.png


def test_unreadable_data_everywhere_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "bad.png", "caption": "x"}) + "\n")
    dataset = CaptionDataset(JsonlCaptions(str(path)), ByteTokenizer(), 8, TrainTransform(16), seed=0)
    with pytest.raises(RuntimeError, match="could not be read"):
        dataset[(0, 0)]


def test_open_source_rejects_unknown_data(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        open_source(str(tmp_path / "x.csv"), 16)
    with pytest.raises(FileNotFoundError):
        TarShards(str(tmp_path))  # no shards in an empty directory
