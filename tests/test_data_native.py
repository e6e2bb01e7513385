"""Native-resolution data: built-in shapes at their own sizes, native transforms, the patch-budget packer."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from aimv2.data import (ByteTokenizer, CaptionDataset, NativeNormalize, NativeTransform, PackedBatches, PatchSamples,
                        SampleOrder, ShapesDataset, native_transform_for, open_source)
from aimv2.data.synthetic import COLOURS, KINDS, PLACES
from aimv2.packing import PackedImages
from aimv2.patchify import patchify

PATCH, MAX_PATCHES, BUDGET = 4, 64, 160


def _native(seed=0, length=200):
    return ShapesDataset(32, seed=seed, length=length, patch_size=PATCH, max_patches=MAX_PATCHES)


# ---- built-in shapes ---------------------------------------------------------------------------------

def test_square_mode_renders_as_before():
    """Pixels and captions of the square run are those drawn before native mode existed (digests
    taken from that code; Pillow's rasterizer is part of what they pin)."""
    golden = {
        (32, 0): ("bf51f972df9ba78c1038f234f93fb210889ee317a40ce92f40d35a4a957d2bc0",
                  ["a large green star on the right", "a medium white circle in the bottom right",
                   "a large yellow circle in the top left"]),
        (56, 3): ("0ffca624ce81b85c275c861ce5564489d9bf77c6a7bd302939258d1ded6c1082",
                  ["a large red circle in the top left", "a large orange triangle in the top right",
                   "a large purple circle in the top left"]),
    }
    for (size, seed), (digest, captions) in golden.items():
        ds = ShapesDataset(size, seed=seed)
        h = hashlib.sha256()
        for i in range(8):
            image, caption = ds.load(i)
            assert image.size == (size, size) and ds.image_hw(i) == (size, size)
            h.update(np.asarray(image).tobytes())
            if i < 3:
                assert caption == captions[i]
        assert h.hexdigest() == digest
    assert ShapesDataset(32, length=10).describe() == "built-in shapes (10 samples of 32 px, seed 0)"


def test_native_sizes_are_whole_patches_under_the_budget_and_vary():
    ds = _native()
    sizes = [ds.image_hw(i) for i in range(50)]
    for i, (H, W) in enumerate(sizes):
        h, w = H // PATCH, W // PATCH
        assert H % PATCH == 0 and W % PATCH == 0 and h * w <= MAX_PATCHES
        assert min(H, W) >= 16 and 0.4 <= w / h <= 2.5  # aspect in [1/2, 2] up to a patch of rounding
        assert ds.load(i)[0].size == (W, H)
    assert len(set(sizes)) >= 10
    aspects = [W / H for H, W in sizes]
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    assert "mixed sizes up to 64 patches" in ds.describe()


def test_native_samples_are_deterministic_and_keep_square_mode_attributes():
    a, b, square = _native(seed=5), _native(seed=5), ShapesDataset(32, seed=5)
    for i in (0, 7, 33):
        (img_a, cap_a), (img_b, cap_b) = a.load(i), b.load(i)
        assert cap_a == cap_b == square.load(i)[1] and np.array_equal(np.asarray(img_a), np.asarray(img_b))
        assert a.label(i) == square.label(i)
    assert [_native(seed=6).image_hw(i) for i in range(10)] != [a.image_hw(i) for i in range(10)]


def test_native_captions_name_the_cell_of_the_rectangle():
    """The shape's centre has the named colour and lies in the named cell of the image's 3x3 grid."""
    ds, checked = _native(length=100), 0
    for i in range(100):
        attrs = ds._attributes(i)
        if KINDS[attrs["kind"]] not in ("circle", "square", "cross"):
            continue  # centres of these are always filled
        image, caption = ds.load(i)
        H, W = ds.image_hw(i)
        words = caption.split()
        cx, cy = attrs["centre"]
        pixel = np.asarray(image)[int(cy), int(cx)].astype(int)
        assert np.abs(pixel - np.array(COLOURS[words[2]])).max() <= 15
        row, col = divmod(PLACES.index(" ".join(words[4:])), 3)
        assert int(cx // (W / 3)) == col and int(cy // (H / 3)) == row
        checked += 1
    assert checked > 20


def test_native_shapes_reject_bad_arguments():
    with pytest.raises(ValueError, match="together"):
        ShapesDataset(32, patch_size=4)
    with pytest.raises(ValueError, match="together"):
        ShapesDataset(32, max_patches=64)
    with pytest.raises(ValueError, match="max_patches must be at least 16"):
        ShapesDataset(32, patch_size=4, max_patches=15)  # 16 px sides need 4x4 patches
    with pytest.raises(ValueError, match="max_patches must be at least 2"):
        ShapesDataset(32, patch_size=16, max_patches=1)
    with pytest.raises(ValueError, match="patch_size"):
        ShapesDataset(32, patch_size=0, max_patches=64)


def test_open_source_and_native_transform_for():
    source = open_source("builtin", 32, seed=1, builtin_size=50, patch_size=PATCH, max_patches=MAX_PATCHES)
    assert (source.patch_size, source.max_patches, len(source), source.seed) == (PATCH, MAX_PATCHES, 50, 1)
    assert isinstance(native_transform_for(source, PATCH, MAX_PATCHES), NativeNormalize)
    assert open_source("builtin", 32).max_patches is None
    real = native_transform_for(object(), PATCH, MAX_PATCHES)
    assert isinstance(real, NativeTransform) and (real.patch_size, real.max_patches) == (PATCH, MAX_PATCHES)


# ---- transforms --------------------------------------------------------------------------------------

def _photo(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_native_transform_keeps_the_aspect_ratio_within_the_budget():
    t = NativeTransform(PATCH, MAX_PATCHES)
    for width, height in [(1000, 300), (300, 1000), (50, 50), (640, 480)]:
        x = t(_photo(width, height), np.random.default_rng(0))
        _, H, W = x.shape
        h, w = H // PATCH, W // PATCH
        assert H % PATCH == 0 and W % PATCH == 0 and h * w <= MAX_PATCHES
        assert h * w > MAX_PATCHES / 2  # scaled down no further than needed
        # each side is rounded down by less than one patch
        assert w / (h + 1) < width / height < (w + 1) / h
    assert t(_photo(50, 50), np.random.default_rng(0)).shape == (3, 32, 32)
    assert t(_photo(13, 10), np.random.default_rng(0)).shape == (3, 8, 12)  # never scaled up
    assert t(_photo(3, 2), np.random.default_rng(0)).shape == (3, 4, 8)  # except to two patches, along the longer side
    assert t(_photo(2, 5), np.random.default_rng(0)).shape == (3, 8, 4)
    assert t(_photo(4000, 3), np.random.default_rng(0)).shape == (3, 4, 4 * MAX_PATCHES)


def test_native_transform_flips_with_the_rng():
    image = _photo(40, 24)
    plain = NativeTransform(PATCH, MAX_PATCHES, flip=False)(image, np.random.default_rng(0))
    t = NativeTransform(PATCH, MAX_PATCHES)
    flipped = []
    for seed in range(16):
        x = t(image, np.random.default_rng(seed))
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        assert torch.equal(x, t(image, np.random.default_rng(seed)))
        flipped.append(not torch.equal(x, plain))
    assert any(flipped) and not all(flipped)


def test_native_normalize_needs_whole_patches():
    t = NativeNormalize(PATCH)
    assert t(_photo(12, 8)).shape == (3, 8, 12)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        t(_photo(12, 10))


# ---- packing by a patch budget -----------------------------------------------------------------------

class _BrokenAt(ShapesDataset):
    """Built-in shapes whose sample `broken` cannot be read."""

    def __init__(self, broken, **kwargs):
        super().__init__(32, length=200, patch_size=PATCH, max_patches=MAX_PATCHES, **kwargs)
        self.broken = broken

    def load(self, index):
        if index == self.broken:
            raise OSError("truncated")
        return super().load(index)


def _samples(source=None):
    source = source or _native()
    return PatchSamples(CaptionDataset(source, ByteTokenizer(), 48, NativeNormalize(PATCH), seed=0), PATCH)


def _take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["images"].grid == y["images"].grid and x["cursor"] == y["cursor"] and x["skipped"] == y["skipped"]
        assert torch.equal(x["images"].patches, y["images"].patches) and torch.equal(x["tokens"], y["tokens"])
        assert torch.equal(x["images"].cu_seqlens, y["images"].cu_seqlens)


def test_patch_samples_patchify_the_image():
    samples = _samples()
    sample = samples[(0, 3)]
    image = samples.dataset[(0, 3)]["image"]
    h, w = sample["grid"]
    assert (h * PATCH, w * PATCH) == tuple(image.shape[1:]) and sample["patches"].shape == (h * w, PATCH * PATCH * 3)
    assert torch.equal(sample["patches"], patchify(image.unsqueeze(0), PATCH)[0])
    assert sample["tokens"].shape == (48,) and sample["skipped"] == 0


def test_batches_fill_the_budget_with_the_stream_in_order():
    """Batch after batch is the rank's stream cut greedily: nothing lost, duplicated or reordered,
    each batch within the budget, and the sample that did not fit opens the next batch."""
    samples, order = _samples(), SampleOrder(200, seed=0)
    batches = _take(PackedBatches(samples, order, BUDGET), 8)
    k = 0
    for i, batch in enumerate(batches):
        images = batch["images"]
        assert isinstance(images, PackedImages) and images.total <= BUDGET
        assert batch["tokens"].shape == (images.num_images, 48) and batch["tokens"].dtype == torch.int64
        for patches, grid, tokens in zip(images.split(images.patches), images.grid, batch["tokens"]):
            expected = samples[order.key(k)]
            assert grid == expected["grid"] and torch.equal(patches, expected["patches"])
            assert torch.equal(tokens, expected["tokens"])
            k += 1
        assert batch["cursor"] == k
        if i + 1 < len(batches):
            first_of_next = batches[i + 1]["images"].lengths[0]
            assert images.total + first_of_next > BUDGET
    assert sum(b["images"].num_images for b in batches) > 8 * 2  # several images per batch


def test_resume_from_the_cursor_gives_the_following_batches():
    samples, order = _samples(), SampleOrder(200, seed=0)
    batches = _take(PackedBatches(samples, order, BUDGET), 6)
    resumed = _take(PackedBatches(samples, order, BUDGET, start=batches[2]["cursor"]), 3)
    _assert_same_batches(resumed, batches[3:])


def test_ranks_take_disjoint_interleaved_streams():
    samples, order = _samples(), SampleOrder(200, seed=0)
    seen = []
    for rank in range(2):
        batches = _take(PackedBatches(samples, order, BUDGET, rank=rank, world=2), 4)
        patches = [p for b in batches for p in b["images"].split(b["images"].patches)]
        assert batches[-1]["cursor"] == len(patches)
        for k, p in enumerate(patches):
            assert torch.equal(p, samples[order.key(rank + 2 * k)]["patches"])
        seen.append({order.key(rank + 2 * k) for k in range(len(patches))})
    assert not seen[0] & seen[1]


def test_workers_give_the_same_batches_as_the_main_process():
    samples, order = _samples(), SampleOrder(200, seed=0)
    inline = _take(PackedBatches(samples, order, BUDGET), 4)
    parallel = _take(PackedBatches(samples, order, BUDGET, workers=2), 4)
    _assert_same_batches(parallel, inline)


def test_skipped_samples_are_counted_in_their_batch():
    order = SampleOrder(200, seed=0, shuffle=False)  # key k is index k: index 5 is in an early batch
    batches = _take(PackedBatches(_samples(_BrokenAt(5)), order, BUDGET), 4)
    assert sum(b["skipped"] for b in batches) == 1


def test_a_sample_over_the_budget_is_an_error():
    with pytest.raises(ValueError, match=r"grid of \d+x\d+ = \d+ patches, more than the budget of 20.*--max-tokens"):
        _take(PackedBatches(_samples(), SampleOrder(200, seed=0), 20), 1)
    with pytest.raises(ValueError, match="budget"):
        PackedBatches(_samples(), SampleOrder(200, seed=0), 0)
    with pytest.raises(ValueError, match="rank"):
        PackedBatches(_samples(), SampleOrder(200, seed=0), BUDGET, rank=2, world=2)
