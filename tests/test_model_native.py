"""Native-resolution AIMv2: 2-D sin-cos positions, packed images of different sizes through the
encoder and decoder, and the packed loss equal to the padded one image by image."""
import math

import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Encoder, AIMv2Model
from aimv2.config import PRESETS
from aimv2.packing import DecoderLayout, PackedImages
from aimv2.patchify import resolve_packed_prefix_len
from aimv2.positions import sincos_grid
from helpers import assert_close
from test_model import randomize_norms

NATIVE = AIMv2Config.preset("tiny", native=True, enc_depth=2, dec_depth=2, max_text_len=10)
# (C, H, W) sizes in pixels of 4-px patches: wide, tall, tiny, square, odd grids
SIZES = [(3, 16, 40), (3, 36, 12), (3, 8, 8), (3, 32, 32), (3, 20, 28)]


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


def _model(dtype=torch.float64, cfg=NATIVE):
    torch.manual_seed(0)
    model = AIMv2Model(cfg).to(dtype)
    randomize_norms(model)
    return model


def _images(sizes=SIZES, dtype=torch.float64):
    return [torch.randn(*size, dtype=dtype) for size in sizes]


def _tokens(n, cfg=NATIVE):
    tokens = torch.randint(1, cfg.vocab_size, (n, cfg.max_text_len))
    tokens[0, 6:] = cfg.pad_id
    tokens[-1, 3:] = cfg.pad_id
    return tokens


# ---- positions and config -----------------------------------------------------------------------

def test_sincos_positions_follow_the_half_swapped_formula():
    dim, h, w = 16, 3, 5
    pos = sincos_grid(h, w, dim, dtype=torch.float64)  # (15, 16)
    omega = [10000 ** (-k / 4) for k in range(4)]
    for n, (row, col) in enumerate((r, c) for r in range(h) for c in range(w)):
        expected = ([math.sin(col * o) for o in omega] + [math.cos(col * o) for o in omega]
                    + [math.sin(row * o) for o in omega] + [math.cos(row * o) for o in omega])
        assert torch.allclose(pos[n], torch.tensor(expected, dtype=torch.float64), atol=1e-12), (row, col)


def test_every_preset_can_be_native_and_has_no_position_table():
    for name in PRESETS:
        cfg = AIMv2Config.preset(name, native=True)
        with torch.device("meta"):
            encoder = AIMv2Encoder(cfg)
        assert encoder.pos_embed is None and "pos_embed" not in encoder.state_dict()
    with pytest.raises(TypeError, match="native must be a bool"):
        AIMv2Config.preset("tiny", native=1)


def test_native_encoder_takes_any_patch_multiple_and_refuses_others():
    encoder = AIMv2Encoder(NATIVE)
    assert encoder(torch.randn(2, 3, 12, 44)).shape == (2, 33, NATIVE.enc_dim)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        encoder(torch.randn(1, 3, 12, 42))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        encoder.features([torch.randn(3, 12, 12), torch.randn(3, 10, 12)])
    square = AIMv2Encoder(AIMv2Config.preset("tiny", enc_depth=1))
    with pytest.raises(ValueError, match="native=True"):
        square.features([torch.randn(3, 32, 32), torch.randn(3, 16, 32)])


def test_learned_positions_pack_images_of_the_configured_size():
    """A square (learned-position) encoder packs same-size images: the same features as the batch."""
    encoder = AIMv2Encoder(AIMv2Config.preset("tiny", enc_depth=2)).double()
    randomize_norms(encoder)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    per_image, pooled = encoder.features(list(images))
    batched, batched_pooled = encoder.features(images)
    assert_close(torch.stack(per_image), batched, 1e-12, "packed vs batched features")
    assert_close(pooled, batched_pooled, 1e-12, "pooled")


# ---- packing ------------------------------------------------------------------------------------

def test_packed_images_layout():
    images = _images(SIZES[:3])
    packed = PackedImages.from_images(images, 4)
    assert packed.grid == ((4, 10), (9, 3), (2, 2))
    assert packed.cu_seqlens.tolist() == [0, 40, 67, 71] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == 40 and packed.total == 71
    rows, cols = packed.coordinates()
    assert rows[40:43].tolist() == [0, 0, 0] and cols[40:44].tolist() == [0, 1, 2, 0]
    targets = packed.target_rows()
    assert targets.shape == (68,) and 0 not in targets.tolist() and 40 not in targets.tolist() and 67 not in targets.tolist()
    mask = packed.target_mask(torch.tensor([3, 1, 4]))
    assert mask[:39].tolist() == [k >= 3 for k in range(1, 40)]
    assert mask[39:65].all() and not mask[65:].any()
    with pytest.raises(ValueError, match="multiples of the patch size"):
        PackedImages.from_images([torch.randn(3, 8, 9)], 4)
    with pytest.raises(ValueError, match="non-empty list"):
        PackedImages.from_images([], 4)


def test_decoder_layout_by_hand():
    layout = DecoderLayout.build([2, 3], text_len=2, device="cpu")
    # encoder rows 0-1 image 0, 2-4 image 1; text rows 5-7 (BOS, t0, t1) of image 0, 8-10 of image 1
    assert layout.order.tolist() == [0, 1, 5, 6, 7, 2, 3, 4, 8, 9, 10]
    assert layout.cu_seqlens.tolist() == [0, 5, 11] and layout.max_seqlen == 6
    assert layout.pixel_rows.tolist() == [0, 5, 6]  # positions predicting patch 1 of image 0, patches 1-2 of image 1
    assert layout.text_rows.tolist() == [[2, 3], [8, 9]]


def test_packed_prefix_resolution():
    lengths = [40, 27, 4]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        drawn = resolve_packed_prefix_len(None, lengths, training=True, eval_default=None, device="cpu", generator=g)
        assert all(1 <= int(p) <= n - 1 for p, n in zip(drawn, lengths))
    assert resolve_packed_prefix_len(None, lengths, training=False, eval_default=None, device="cpu").tolist() == [20, 13, 2]
    assert resolve_packed_prefix_len(None, lengths, training=False, eval_default=10, device="cpu").tolist() == [10, 10, 4]
    with pytest.raises(ValueError, match=r"prefix_len\[2\] = 5 is outside \[0, 4\]"):
        resolve_packed_prefix_len(torch.tensor([1, 1, 5]), lengths, training=True, eval_default=None, device="cpu")
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        resolve_packed_prefix_len(torch.tensor([1, 1]), lengths, training=True, eval_default=None, device="cpu")
    with pytest.raises(ValueError, match="at least 2 patches"):
        resolve_packed_prefix_len(None, [4, 1], training=True, eval_default=None, device="cpu")


# ---- packed == padded ---------------------------------------------------------------------------

def _grads(model, loss):
    return [g for g in torch.autograd.grad(loss, list(model.parameters()))]


def test_packed_equals_padded_on_same_size_images():
    model = _model()
    images = torch.randn(4, 3, 24, 20, dtype=torch.float64)  # a native size other than the default
    tokens = _tokens(4)
    prefix = torch.tensor([1, 7, 29, 0])
    padded = model(images, tokens, prefix)
    padded_grads = _grads(model, padded.total)
    packed = model(PackedImages.from_images(list(images), 4), tokens, prefix)
    packed_grads = _grads(model, packed.total)
    for name, a, b in zip(("total", "pixel", "text"), packed, padded):
        assert_close(a, b, 1e-12, name)
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, padded_grads):
        assert_close(a, b, 1e-10, f"grad of {name}")


def test_packed_mixed_sizes_equal_each_image_alone():
    """The packed loss is the batch's token mean: each image run alone (padded path, batch of one),
    weighted by its counted patches and caption tokens, gives the same loss and gradients. Nothing
    crosses an image boundary, or an image alone would differ from the same image packed."""
    model = _model()
    images, tokens = _images(), _tokens(len(SIZES))
    prefix = torch.tensor([3, 26, 1, 0, 34])
    packed = model(PackedImages.from_images(images, 4), tokens, prefix)
    counted = [(i.shape[1] // 4) * (i.shape[2] // 4) - max(int(p), 1) for i, p in zip(images, prefix)]
    words = [int((t != NATIVE.pad_id).sum()) for t in tokens]
    alone_pixel = alone_text = 0.0
    for i, image in enumerate(images):
        loss = model(image.unsqueeze(0), tokens[i : i + 1], prefix[i : i + 1])
        alone_pixel = alone_pixel + loss.pixel * counted[i] / sum(counted)
        alone_text = alone_text + loss.text * words[i] / sum(words)
    assert_close(packed.pixel, alone_pixel, 1e-12, "pixel")
    assert_close(packed.text, alone_text, 1e-12, "text")
    alone_total = NATIVE.alpha * alone_pixel + alone_text
    for (name, _), a, b in zip(model.named_parameters(), _grads(model, packed.total), _grads(model, alone_total)):
        assert_close(a, b, 1e-10, f"grad of {name}")


def test_packed_images_do_not_see_each_other():
    model = _model()
    images, tokens = _images(SIZES[:3]), _tokens(3)
    prefix = torch.tensor([5, 2, 1])

    def outputs(imgs, toks):
        packed = PackedImages.from_images(imgs, 4)
        features = model.encoder(packed, prefix)
        pixel, text = model.decoder.forward_packed(features, packed.lengths, toks)
        return packed.split(features), pixel, text

    base_feats, base_pixel, base_text = outputs(images, tokens)
    changed = [images[0], images[1] + torch.randn_like(images[1]), images[2]]
    feats, pixel, text = outputs(changed, tokens)
    assert torch.equal(feats[0], base_feats[0]) and torch.equal(feats[2], base_feats[2])
    assert (feats[1] - base_feats[1]).abs().max() > 1e-3
    assert torch.equal(pixel[:39], base_pixel[:39]) and torch.equal(pixel[65:], base_pixel[65:])
    assert torch.equal(text[0], base_text[0]) and torch.equal(text[2], base_text[2])
    other = tokens.clone()
    other[0, 0] += 1
    _, pixel, text = outputs(images, other)
    assert torch.equal(pixel, base_pixel) and torch.equal(text[1:], base_text[1:])
    assert torch.equal(text[0, :1], base_text[0, :1]) and (text[0, 1] - base_text[0, 1]).abs().max() > 1e-4


def test_packed_training_mode_samples_per_image_prefixes():
    model = _model(torch.float32)
    packed = PackedImages.from_images(_images(dtype=torch.float32), 4)
    tokens = _tokens(len(SIZES))
    torch.manual_seed(3)
    first = model(packed, tokens)
    torch.manual_seed(3)
    again = model(packed, tokens)
    assert torch.equal(first.total, again.total) and math.isfinite(first.total.item())
    model.eval()
    assert torch.equal(model(packed, tokens).total, model(packed, tokens).total)


@pytest.mark.skipif(ak.unavailable_reason("triton") is not None, reason="the triton backend cannot run here")
def test_packed_model_on_triton_matches_torch(device):
    cfg = AIMv2Config.preset("tiny", native=True, enc_depth=1, dec_depth=1, max_text_len=6)
    model = _model(torch.float32, cfg).to(device)
    images = [i.to(device) for i in _images(SIZES[:3], torch.float32)]
    packed, tokens, prefix = PackedImages.from_images(images, 4), _tokens(3, cfg).to(device), torch.tensor([3, 1, 2], device=device)
    losses, grads = [], []
    for backend in ("torch", "triton"):
        with ak.use_backend(backend):
            loss = model(packed, tokens, prefix)
            losses.append(loss)
            grads.append(_grads(model, loss.total))
    for name, a, b in zip(("total", "pixel", "text"), *losses):
        assert_close(a, b, 3e-4, name)
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert_close(a, b, 1e-3, f"grad of {name}")
