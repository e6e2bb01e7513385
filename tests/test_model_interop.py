"""AIMv2Encoder <-> transformers Aimv2VisionModel: same features on random weights, state dicts that
round-trip. Models are built from small configs: nothing is downloaded."""
import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Encoder
from aimv2.interop import to_transformers, transformers_config_kwargs
from helpers import assert_close
from optional import import_or_skip

transformers = import_or_skip("transformers")
import_or_skip("transformers", "Aimv2VisionModel")  # present and importable in this environment

TINY = AIMv2Config.preset("tiny", enc_depth=2)


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


def _hf_model(use_head=True, **overrides):
    kwargs = transformers_config_kwargs(TINY) | dict(use_head=use_head) | overrides
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**kwargs)).eval()
    with torch.no_grad():  # every weight random, norms included, so a swapped tensor shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_from_transformers_gives_the_same_features():
    hf = _hf_model()
    encoder = AIMv2Encoder.from_transformers(hf).eval()
    assert encoder.config.enc_dim == TINY.enc_dim and encoder.config.enc_depth == 2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state
        feats, pooled = encoder.features(images)
    assert_close(feats, expected, 1e-5, "features")
    assert_close(pooled, expected.mean(1), 1e-5, "mean feature")


def test_from_transformers_copies_weights():
    hf = _hf_model()
    encoder = AIMv2Encoder.from_transformers(hf)
    before = encoder.blocks[0].mlp.fc2.weight.clone()
    with torch.no_grad():
        hf.encoder.layers[0].ffn.down_proj.weight.add_(1.0)
    assert torch.equal(encoder.blocks[0].mlp.fc2.weight, before)
    assert not any(p.is_meta for p in encoder.parameters())


def test_state_dict_round_trips():
    hf = _hf_model(use_head=True)
    encoder = AIMv2Encoder.from_transformers(hf)
    exported = encoder.to_transformers_state_dict()
    trunk = {k: v for k, v in hf.state_dict().items() if not k.startswith("head.")}  # the pooling head is not ours
    assert exported.keys() == trunk.keys()
    for key, value in trunk.items():
        assert torch.equal(exported[key], value), key
    again = AIMv2Encoder.from_transformers(to_transformers(encoder))
    ours = encoder.state_dict()
    assert again.state_dict().keys() == ours.keys()
    assert all(torch.equal(v, ours[k]) for k, v in again.state_dict().items())


def test_a_fresh_encoder_exports_to_transformers():
    encoder = AIMv2Encoder(TINY).eval()
    hf = to_transformers(encoder).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(encoder(images), hf(pixel_values=images).last_hidden_state, 1e-5, "exported features")


@pytest.mark.parametrize("overrides", [dict(qkv_bias=True), dict(mlp_bias=True), dict(hidden_act="gelu")])
def test_unsupported_variants_are_refused(overrides):
    hf = _hf_model(use_head=False, **overrides)
    with pytest.raises(ValueError, match="Aimv2VisionConfig"):
        AIMv2Encoder.from_transformers(hf)


# ---- native resolution (is_native=True: 2-D sin-cos positions, any image size) ----------------

NATIVE = TINY.__class__(**{**TINY.__dict__, "native": True})


def _native_hf_model():
    kwargs = transformers_config_kwargs(NATIVE) | dict(use_head=False)
    model = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model


def test_native_from_transformers_matches_per_image_at_mixed_sizes():
    """One packed forward of images of different sizes equals transformers run on each alone."""
    hf = _native_hf_model()
    assert transformers_config_kwargs(NATIVE)["is_native"] and "embeddings.position_embedding.weight" not in hf.state_dict()
    encoder = AIMv2Encoder.from_transformers(hf).eval()
    assert encoder.config.native and encoder.pos_embed is None
    images = [torch.randn(3, 16, 40), torch.randn(3, 36, 12), torch.randn(3, 8, 8), torch.randn(3, 32, 32)]
    with torch.no_grad():
        per_image, pooled = encoder.features(images)
        for i, image in enumerate(images):
            expected = hf(pixel_values=image.unsqueeze(0)).last_hidden_state[0]  # (N_i, D)
            assert per_image[i].shape == expected.shape
            assert_close(per_image[i], expected, 1e-5, f"image {i} features")
            assert_close(pooled[i], expected.mean(0), 1e-5, f"image {i} pooled")
        # a batch tensor at a non-default size goes the padded way and agrees too
        batch = torch.randn(2, 3, 20, 28)
        assert_close(encoder(batch), hf(pixel_values=batch).last_hidden_state, 1e-5, "batched native features")


def test_native_state_dict_round_trips_without_a_position_table():
    hf = _native_hf_model()
    encoder = AIMv2Encoder.from_transformers(hf)
    exported = encoder.to_transformers_state_dict()
    assert exported.keys() == hf.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in hf.state_dict().items())
    back = to_transformers(encoder)
    assert back.config.is_native
