"""The aimv2 model package on the "torch" backend: config, patches, shapes, init, no leakage, and
equality with the eager reference model."""
import math

import pytest
import torch
import torch.nn.functional as F

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Decoder, AIMv2Encoder, AIMv2Model
from aimv2.patchify import patchify, resolve_prefix_len, sample_prefix_len, target_mask, unpatchify
from aimv2.reference_model import ReferenceAIMv2Model
from helpers import TOLERANCE, assert_close, rel_err

TINY = AIMv2Config.preset("tiny")


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


def _batch(cfg=TINY, B=3, dtype=torch.float32):
    """Random normalized images and captions with some padding (pad id 0) at the end."""
    images = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, dtype=dtype)
    tokens = torch.randint(1, cfg.vocab_size, (B, cfg.max_text_len))
    tokens[0, cfg.max_text_len - 5:] = cfg.pad_id
    tokens[-1, 7:] = cfg.pad_id
    return images, tokens


def randomize_norms(model):
    """Norm weights start at ones; random ones catch a swapped or skipped norm."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                p.uniform_(0.5, 1.5)


# ---- config -------------------------------------------------------------------------------------

def test_presets_and_properties():
    assert (TINY.num_patches, TINY.patch_dim) == (64, 48)
    large = AIMv2Config.preset("large")
    assert (large.num_patches, large.patch_dim, large.enc_hidden) == (256, 588, 2816)
    for name in ("large", "huge", "1b", "3b"):
        c = AIMv2Config.preset(name)
        assert (c.dec_dim, c.dec_depth, c.dec_heads, c.dec_hidden, c.vocab_size, c.max_text_len) == (1024, 12, 8, 2816, 32000, 77)
        assert c.enc_dim // c.enc_heads == 128 and c.enc_depth == 24
    assert AIMv2Config.preset("tiny", max_text_len=8).max_text_len == 8


@pytest.mark.parametrize("overrides, error", [
    (dict(enc_heads=3), ValueError),  # head dim 64/3 not supported
    (dict(patch_size=5), ValueError),  # 32 px not divisible
    (dict(pad_id=259), ValueError),
    (dict(image_size=4), ValueError),  # a single patch
    (dict(eval_prefix_len=65), ValueError),
    (dict(no_such_field=1), TypeError),
])
def test_config_rejects_bad_values(overrides, error):
    with pytest.raises(error):
        AIMv2Config.preset("tiny", **overrides)
    with pytest.raises(ValueError, match="unknown preset"):
        AIMv2Config.preset("giant")


RELEASED = {"large": (0.3, 309e6), "huge": (0.6, 681e6), "1b": (1.2, 1.23e9), "3b": (2.7, 2.72e9)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_preset_parameter_counts_match_released_sizes(name):
    """Counted on the meta device: no memory is allocated for billions of parameters."""
    with torch.device("meta"):
        model = AIMv2Model(AIMv2Config.preset(name))
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.encoder.parameters())
    paper, card = RELEASED[name]
    assert math.floor(count / 1e8) / 10 == paper, count  # the paper's rounded size
    assert abs(count - card) / card < 0.01, count  # the released checkpoints' counts


def test_tiny_is_small():
    count = sum(p.numel() for p in AIMv2Model(TINY).parameters())
    assert 1e5 < count < 1e6


# ---- patches and prefixes -----------------------------------------------------------------------

def test_patchify_order_matches_the_patch_conv():
    """(h, w, p, q, c) order: a linear map of patchify's rows reproduces the conv."""
    images = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 5, kernel_size=4, stride=4, dtype=torch.float64)
    expected = conv(images).flatten(2).transpose(1, 2)  # (B, N, 5), row-major patches
    weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (out, p * q * c)
    assert_close(patchify(images, 4) @ weight.T + conv.bias, expected, 1e-12, "conv via patchify")
    p1 = images[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, -1)  # second patch: top row, second column
    assert torch.equal(patchify(images, 4)[:, 1], p1)


def test_unpatchify_inverts_patchify():
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(images, 4), 4, 3), images)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 10, 8), 4)


def test_target_mask_counts_patches_at_or_after_the_prefix():
    mask = target_mask(torch.tensor([1, 3, 5]), 5)  # entry i is patch i + 1
    expected = torch.tensor([[True, True, True, True], [False, False, True, True], [False, False, False, False]])
    assert torch.equal(mask, expected)


def test_prefix_sampling_and_resolution():
    torch.manual_seed(1)
    draws = sample_prefix_len(4000, 9)
    assert draws.min() == 1 and draws.max() == 8 and len(draws.unique()) == 8
    torch.manual_seed(1)
    assert torch.equal(resolve_prefix_len(None, 4000, 9, training=True, eval_default=None, device="cpu"), draws)
    assert resolve_prefix_len(None, 2, 64, training=False, eval_default=None, device="cpu").tolist() == [32, 32]
    assert resolve_prefix_len(None, 2, 64, training=False, eval_default=7, device="cpu").tolist() == [7, 7]
    assert resolve_prefix_len(3, 2, 64, training=True, eval_default=None, device="cpu").tolist() == [3, 3]
    for bad in (65, -1, torch.tensor([1, 70]), torch.tensor([1])):
        with pytest.raises(ValueError):
            resolve_prefix_len(bad, 2, 64, training=True, eval_default=None, device="cpu")
    with pytest.raises(TypeError):
        resolve_prefix_len(2.5, 2, 64, training=True, eval_default=None, device="cpu")


# ---- shapes, init, modes ------------------------------------------------------------------------

def test_encoder_shapes_and_features():
    enc = AIMv2Encoder(TINY)
    images, _ = _batch()
    out = enc(images)
    assert out.shape == (3, 64, 64)
    feats, pooled = enc.features(images)
    assert torch.equal(feats, out) and torch.allclose(pooled, out.mean(1))
    assert enc(images, torch.tensor([3, 9, 63])).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="images"):
        enc(torch.randn(2, 3, 28, 28))


def test_decoder_shapes_and_short_captions():
    dec = AIMv2Decoder(TINY)
    feats = torch.randn(2, 64, TINY.enc_dim)
    pixel, text = dec(feats, torch.randint(0, 259, (2, 10)))
    assert pixel.shape == (2, 63, 48) and text.shape == (2, 10, TINY.dec_dim)
    assert dec.text_logits(text).shape == (2, 10, 259)
    with pytest.raises(ValueError, match="tokens"):
        dec(feats, torch.randint(0, 259, (2, 25)))
    with pytest.raises(TypeError, match="tokens"):
        dec(feats, torch.rand(2, 10))


def test_weight_init_as_the_original():
    model = AIMv2Model(AIMv2Config.preset("tiny", enc_dim=128, enc_heads=4, dec_dim=128, dec_heads=4))
    qkv = model.encoder.blocks[0].attn.qkv.weight  # (3D, D): xavier over the fused matrix
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    conv = model.encoder.patch_embed.weight  # fans: out = D, in = c * p * p
    assert conv.abs().max() <= math.sqrt(6 / (conv.shape[0] + conv[0].numel()))
    assert torch.all(model.encoder.patch_embed.bias == 0) and torch.all(model.decoder.image_proj.bias == 0)
    for emb in (model.decoder.token_embed.weight, model.decoder.pos_embed, model.encoder.pos_embed):
        assert abs(emb.std().item() - 0.02) < 0.003
    assert torch.all(model.encoder.blocks[0].norm1.weight == 1)


def test_training_mode_samples_prefixes_reproducibly_and_eval_is_deterministic():
    model = AIMv2Model(TINY)
    images, tokens = _batch()
    torch.manual_seed(5)
    a = model(images, tokens).total
    torch.manual_seed(5)
    b = model(images, tokens).total
    assert torch.equal(a, b)
    model.eval()
    assert torch.equal(model(images, tokens).total, model(images, tokens, TINY.num_patches // 2).total)
    assert model(images, tokens, TINY.num_patches).pixel == 0  # nothing counted past a full prefix


def test_no_weight_decay_names():
    names = AIMv2Model(TINY).no_weight_decay()
    assert {"encoder.pos_embed", "decoder.pos_embed", "decoder.bos", "encoder.patch_embed.bias", "encoder.norm.weight"} <= names
    assert "encoder.blocks.0.attn.qkv.weight" not in names and "decoder.token_embed.weight" not in names


# ---- no leakage ---------------------------------------------------------------------------------

def _perturb_patch(images, j, grid, p):
    out = images.clone()
    r, c = divmod(j, grid)
    out[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn_like(out[:, :, :p, :p])
    return out


def test_encoder_prefix_attention_does_not_leak():
    enc = AIMv2Encoder(TINY)
    randomize_norms(enc)
    images, _ = _batch(B=2)
    M = 5
    base = enc(images, M)
    for j in (M, M + 6, 63):
        changed = enc(_perturb_patch(images, j, TINY.grid_size, TINY.patch_size), M)
        assert torch.equal(changed[:, :j], base[:, :j]), f"patch {j} leaked into earlier positions"
        assert (changed[:, j] - base[:, j]).abs().max() > 1e-3
    # inside the prefix attention is bidirectional: patch 3 < M reaches position 0
    changed = enc(_perturb_patch(images, 3, TINY.grid_size, TINY.patch_size), M)
    assert (changed[:, 0] - base[:, 0]).abs().max() > 1e-3


def test_model_predictions_do_not_leak():
    """Pixel prediction i (of patch i + 1) never sees patch i + 1 or later once past the prefix, and
    the prediction of caption token k never sees token k or later."""
    model = AIMv2Model(TINY)
    randomize_norms(model)
    images, tokens = _batch(B=2)
    M = 9

    def predictions(imgs, toks):
        pixel, text = model.decoder(model.encoder(imgs, M), toks)
        return pixel, model.decoder.text_logits(text)

    base_pixel, base_text = predictions(images, tokens)
    for j in (M, 30, 63):
        pixel, text = predictions(_perturb_patch(images, j, TINY.grid_size, TINY.patch_size), tokens)
        assert torch.equal(pixel[:, :j], base_pixel[:, :j]), f"patch {j} leaked into the prediction of patches <= {j}"
        if j < TINY.num_patches - 1:  # position j predicts patch j + 1 and sees patch j
            assert (pixel[:, j] - base_pixel[:, j]).abs().max() > 1e-4
    for k in (0, 11, TINY.max_text_len - 1):
        changed = tokens.clone()
        changed[:, k] = (changed[:, k] + 1) % TINY.vocab_size
        pixel, text = predictions(images, changed)
        assert torch.equal(text[:, : k + 1], base_text[:, : k + 1]), f"token {k} leaked into its own prediction"
        assert torch.equal(pixel, base_pixel)
        if k + 1 < TINY.max_text_len:
            assert (text[:, k + 1] - base_text[:, k + 1]).abs().max() > 1e-4


# ---- equality with the eager reference ----------------------------------------------------------

def assert_same_loss_and_grads(model, ours, reference, theirs, loss_tol, grad_tol):
    """The three loss terms agree, and after backward every parameter's gradient does."""
    for name, a, b in zip(("total", "pixel", "text"), ours, theirs):
        assert_close(a, b, loss_tol, name)
    ours.total.backward()
    theirs.total.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, grad_tol, f"grad of {name}")


def _pair(cfg, dtype):
    model = AIMv2Model(cfg).to(dtype)
    randomize_norms(model)
    reference = ReferenceAIMv2Model(cfg).to(dtype)
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_matches_eager_reference(dtype):
    model, reference = _pair(TINY, dtype)
    images, tokens = _batch(dtype=dtype)
    prefix = torch.tensor([1, 17, 63])
    ours, theirs = model(images, tokens, prefix), reference(images, tokens, prefix)
    assert_same_loss_and_grads(model, ours, reference, theirs, TOLERANCE[dtype], 10 * TOLERANCE[dtype])


def test_model_matches_reference_in_training_mode_with_the_same_seed():
    model, reference = _pair(TINY, torch.float32)
    images, tokens = _batch()
    torch.manual_seed(3)
    ours = model(images, tokens)
    torch.manual_seed(3)
    theirs = reference(images, tokens)
    assert_close(ours.total, theirs.total, TOLERANCE[torch.float32], "total")


def test_encoder_bidirectional_matches_reference():
    model, reference = _pair(TINY, torch.float64)
    images, _ = _batch(dtype=torch.float64)
    assert_close(model.encoder(images), reference.encoder(images), 1e-10, "bidirectional features")


def test_loss_by_hand_on_decoder_states():
    """The shifts and masks of SPEC section 2 written out position by position."""
    cfg = TINY
    model = AIMv2Model(cfg).double()
    images, tokens = _batch(B=2, dtype=torch.float64)
    prefix = torch.tensor([20, 50])
    loss = model(images, tokens, prefix)
    h = model.decoder.hidden_states(model.encoder(images, prefix), tokens)  # (B, N + 1 + T, D)
    N, patches = cfg.num_patches, patchify(images, cfg.patch_size)
    errors, nll, count = [], 0.0, 0
    for b in range(2):
        for i in range(N - 1):
            if i + 1 >= prefix[b]:
                t = patches[b, i + 1]
                t = (t - t.mean()) / (t.var() + cfg.norm_pix_eps).sqrt()
                errors.append(F.mse_loss(model.decoder.pixel_head(h[b, i]), t))
        for k in range(cfg.max_text_len):
            if tokens[b, k] != cfg.pad_id:
                logits = model.decoder.text_head(h[b, N + k])  # BOS at N predicts token 0
                nll = nll + F.cross_entropy(logits[None], tokens[b, k][None])
                count += 1
    assert rel_err(loss.pixel, torch.stack(errors).mean()) < 1e-10
    assert rel_err(loss.text, nll / count) < 1e-10
    assert rel_err(loss.total, cfg.alpha * loss.pixel + loss.text) < 1e-12


def test_bf16_autocast_runs_close_to_fp32():
    model = AIMv2Model(TINY)
    images, tokens = _batch()
    fp32 = model(images, tokens, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(images, tokens, 8)
    bf16.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(bf16.total.item() - fp32.total.item()) / fp32.total.item() < 3e-2
