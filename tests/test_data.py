"""Built-in shapes, tokenizers, transforms, and the sample order of the training loader."""
import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import BatchKeys, ByteTokenizer, CaptionDataset, EvalTransform, SampleOrder, ShapesDataset, TrainTransform, load_tokenizer, make_loader
from aimv2.data.synthetic import COLOURS, KINDS, PLACES, SIZES
from aimv2.data.transforms import MEAN, STD, random_resized_crop_box, to_normalized_tensor


# ---- built-in shapes --------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_vary():
    a, b = ShapesDataset(32, seed=3), ShapesDataset(32, seed=3)
    for i in (0, 1, 17):
        (img_a, cap_a), (img_b, cap_b) = a.load(i), b.load(i)
        assert cap_a == cap_b and np.array_equal(np.asarray(img_a), np.asarray(img_b))
    captions = {a.load(i)[1] for i in range(40)}
    assert len(captions) > 30  # 945 possible captions; 40 draws rarely repeat
    assert ShapesDataset(32, seed=4).load(0)[1] != a.load(0)[1] or not np.array_equal(
        np.asarray(ShapesDataset(32, seed=4).load(0)[0]), np.asarray(a.load(0)[0]))


def test_caption_words_match_the_drawn_shape():
    """The caption names the colour and place of what is drawn: the shape's centre pixel has the
    named colour (up to the jitter), and it lies in the named third of the image."""
    ds = ShapesDataset(64, seed=0)
    for i in range(60):
        attrs = ds._attributes(i)
        if KINDS[attrs["kind"]] not in ("circle", "square", "cross"):
            continue  # centres of these are always filled
        image, caption = ds.load(i)
        words = caption.split()
        assert words[1] in SIZES and words[2] in COLOURS and words[3] in KINDS
        assert caption.endswith(PLACES[attrs["place"]])
        cx, cy = attrs["centre"]
        pixel = np.asarray(image)[int(cy), int(cx)].astype(int)
        assert np.abs(pixel - np.array(COLOURS[words[2]])).max() <= 15
        row, col = divmod(PLACES.index(" ".join(words[4:])), 3)
        assert int(cx // (64 / 3)) == col and int(cy // (64 / 3)) == row
    assert ds.label(0) == KINDS.index(ds.load(0)[1].split()[3])


def test_max_caption_tokens_bounds_every_caption():
    ds, tok = ShapesDataset(32), ByteTokenizer()
    longest = ds.max_caption_tokens(tok)
    assert all(len(tok.encode(ds.load(i)[1])) <= longest for i in range(200))
    assert longest == len(tok.encode("a medium purple triangle in the bottom right"))


def test_shapes_reject_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(8)
    with pytest.raises(IndexError):
        ShapesDataset(32, length=5).load(5)


# ---- tokenizers ------------------------------------------------------------------------------------

def test_byte_tokenizer_roundtrip_padding_truncation():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 259)
    ids = tok.encode("héllo")
    assert ids[-1] == tok.eos_id and min(ids[:-1]) >= 3 and tok.decode(ids) == "héllo"
    padded = tok.encode_padded("ab", 5)
    assert padded.tolist() == [ord("a") + 3, ord("b") + 3, 1, 0, 0] and padded.dtype == torch.int64
    assert tok.encode_padded("abcdef", 3).tolist() == [ord(c) + 3 for c in "abc"]
    assert tok.batch(["a", "bcd"], 4).shape == (2, 4)


def test_tokenizers_json_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2, "red": 3, "circle": 4}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(path))
    assert tok.pad_id == 1 and tok.eos_id == 5 and tok.vocab_size == 6  # eos appended after the vocabulary
    assert tok.encode("a red circle") == [2, 3, 4, 5]
    assert tok.encode_padded("a red", 4).tolist() == [2, 3, 5, 1]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    other = tmp_path / "vocab.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="expected"):
        load_tokenizer(str(other))


# ---- transforms ------------------------------------------------------------------------------------

def test_random_resized_crop_box_stays_inside_with_the_right_area():
    rng = np.random.default_rng(0)
    for width, height in [(100, 80), (37, 200), (64, 64)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
    # an image too narrow for the aspect range falls back to the largest centred crop within it
    assert random_resized_crop_box(10, 1000, np.random.default_rng(0), scale=(0.99, 1.0)) == (0, 493, 10, 506)


def test_random_resized_crop_area_distribution():
    rng = np.random.default_rng(1)
    areas = []
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(300, 300, rng)
        areas.append((right - left) * (bottom - top) / 300 ** 2)
    assert min(areas) >= 0.39 and max(areas) <= 1.0 and np.mean(areas) == pytest.approx(0.7, abs=0.08)


def test_normalization_and_train_transform_determinism():
    white = Image.new("RGB", (10, 6), (255, 255, 255))
    x = to_normalized_tensor(white)
    assert x.shape == (3, 6, 10)
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x[:, 0, 0], expected)
    gradient = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = TrainTransform(16)
    a = t(gradient, np.random.default_rng([1, 2, 3]))
    b = t(gradient, np.random.default_rng([1, 2, 3]))
    c = t(gradient, np.random.default_rng([1, 2, 4]))
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert EvalTransform(16)(gradient).shape == (3, 16, 16)


# ---- sample order and batches ----------------------------------------------------------------------

def test_sample_order_is_a_permutation_per_epoch():
    order = SampleOrder(10, seed=0)
    epoch0 = [order.key(p) for p in range(10)]
    epoch1 = [order.key(p) for p in range(10, 20)]
    assert sorted(i for _, i in epoch0) == list(range(10)) and {e for e, _ in epoch0} == {0}
    assert sorted(i for _, i in epoch1) == list(range(10)) and {e for e, _ in epoch1} == {1}
    assert [i for _, i in epoch0] != [i for _, i in epoch1]
    assert [SampleOrder(10, seed=0).key(p) for p in range(10)] == epoch0


def _take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_batch_keys_split_a_step_over_ranks_and_accumulation():
    """Any (ranks x accumulation) split of a step covers exactly that step's global batch."""
    order = SampleOrder(50, seed=1)
    single = _take(BatchKeys(order, 8), 3)  # three steps of 8
    for accum, world in [(2, 1), (1, 2), (2, 2), (4, 2)]:
        per_rank = [_take(BatchKeys(order, 8, accum, rank, world), 3 * accum) for rank in range(world)]
        for step in range(3):
            got = [k for rank in range(world) for k in sum(per_rank[rank][step * accum:(step + 1) * accum], [])]
            assert sorted(got) == sorted(single[step])
    resumed = _take(BatchKeys(order, 8, start_step=2), 1)
    assert resumed[0] == single[2]
    with pytest.raises(ValueError, match="multiple"):
        BatchKeys(order, 6, grad_accum=4)


def test_caption_dataset_and_loader_with_a_worker_match_the_main_process():
    source = ShapesDataset(16, seed=0, length=64)
    dataset = CaptionDataset(source, ByteTokenizer(), 48, EvalTransform(16), seed=0)
    keys = BatchKeys(SampleOrder(len(source), 0), 4)
    inline = _take(make_loader(dataset, keys, workers=0), 3)
    threaded = _take(make_loader(dataset, keys, workers=1), 3)
    for a, b in zip(inline, threaded):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["tokens"], b["tokens"]) and a["skipped"] == b["skipped"] == 0
    assert inline[0]["image"].shape == (4, 3, 16, 16) and inline[0]["tokens"].shape == (4, 48)
