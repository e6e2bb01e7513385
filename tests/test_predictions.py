"""Held-out predictions: greedy captions, caption accuracy, pixel predictions mapped back to pixels,
and predictions.png, for square and native-resolution models."""
import os

import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Model
from aimv2.data import ByteTokenizer, ShapesDataset
from aimv2.patchify import patchify
from aimv2.predictions import (caption_accuracy, draw_predictions, greedy_tokens, held_out_set, predicted_pixels,
                               _encode)
from test_model import randomize_norms

TOKENIZER = ByteTokenizer()


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


def _model(native=False):
    torch.manual_seed(0)
    cfg = AIMv2Config.preset("tiny", enc_depth=1, dec_depth=1, max_text_len=12, native=native)
    model = AIMv2Model(cfg).eval()
    randomize_norms(model)
    return model


def test_caption_accuracy_counts_exact_captions_and_words_in_place():
    truth = ["a red circle", "a big blue square", "a cross"]
    predicted = ["a red circle", "a blue square", "a cross on top"]
    scores = caption_accuracy(predicted, truth)
    assert scores["caption_exact"] == pytest.approx(1 / 3)
    # words in place: 3 of 3, then "a" only (1 of 4: "blue" sits where "big" is), then 2 of 2
    assert scores["caption_word_acc"] == pytest.approx((3 + 1 + 2) / 9)
    with pytest.raises(ValueError, match="as many"):
        caption_accuracy(["a"], truth)


@pytest.mark.parametrize("native", [False, True], ids=["square", "native"])
def test_greedy_tokens_are_the_argmax_of_their_own_teacher_forced_logits(native):
    """Feeding the greedy caption back in, every position's argmax is the token greedy chose: the
    decoding reads the right position and sees no token at or after the one it predicts."""
    model = _model(native)
    held = held_out_set(ShapesDataset(32), model.config, 5)
    if native:
        assert len({tuple(i.shape) for i in held.images}) > 1  # mixed sizes
    tokens = greedy_tokens(model, held.images, eos_id=TOKENIZER.eos_id, pad_id=TOKENIZER.pad_id, batch_size=2)
    assert tokens.shape == (5, model.config.max_text_len)
    _, decode = _encode(model, held.images)
    with torch.no_grad():
        _, text_hidden = decode(tokens)
        chosen = model.decoder.text_logits(text_hidden).argmax(-1)
    for row, best in zip(tokens.tolist(), chosen.tolist()):
        end = row.index(TOKENIZER.eos_id) + 1 if TOKENIZER.eos_id in row else len(row)
        assert row[:end] == best[:end]
        assert all(t == TOKENIZER.pad_id for t in row[end:])
    one_by_one = torch.cat([greedy_tokens(model, [i], TOKENIZER.eos_id, TOKENIZER.pad_id) for i in held.images])
    assert torch.equal(one_by_one, tokens)


def test_cached_decoding_gives_the_hidden_states_of_the_whole_sequence():
    """start_decoding + decode_next (the key/value cache greedy captioning uses) give, row by row,
    the states of one decoder pass over all tokens; a second cache starts afresh."""
    model = _model()
    held = held_out_set(ShapesDataset(32), model.config, 3)
    images = torch.stack(held.images)
    N = model.config.num_patches
    tokens = torch.randint(3, 200, (3, model.config.max_text_len))
    with torch.no_grad():
        features = model.encoder(images, torch.full((3,), N // 2))
        whole = model.decoder.hidden_states(features, tokens)[:, N:]  # BOS, tokens 0 .. T-2 predict 0 .. T-1
        for _ in range(2):
            first, cache = model.decoder.start_decoding(features)
            rows = [first] + [model.decoder.decode_next(tokens[:, k], cache) for k in range(tokens.shape[1] - 1)]
            torch.testing.assert_close(torch.stack(rows, 1), whole[:, : tokens.shape[1]], rtol=1e-5, atol=1e-5)
        model.decoder.decode_next(tokens[:, -1], cache)  # the last token's row: positions end here
        with pytest.raises(ValueError, match="max_text_len"):
            model.decoder.decode_next(tokens[:, 0], cache)


@pytest.mark.parametrize("native", [False, True], ids=["square", "native"])
def test_predicted_pixels_keep_the_prefix_and_rescale_by_each_target_patch(native):
    model = _model(native)
    image = torch.randn(3, 24, 40) if native else torch.randn(3, 32, 32)
    with torch.no_grad():
        model.decoder.pixel_head.weight.zero_()  # predicts 0 in normalized units: the patch's own mean
    rebuilt = predicted_pixels(model, image, prefix_len=7)
    assert rebuilt.shape == image.shape
    original, out = patchify(image[None], 4)[0], patchify(rebuilt[None], 4)[0]
    assert torch.equal(out[:7], original[:7])
    assert torch.allclose(out[7:], original[7:].mean(-1, keepdim=True).expand_as(out[7:]), atol=1e-6)


def test_draw_predictions_writes_the_picture(tmp_path):
    for native in (False, True):
        model = _model(native)
        held = held_out_set(ShapesDataset(32), model.config, 3)
        path = draw_predictions(model, held, TOKENIZER, str(tmp_path / f"p{native}.png"), rows=3, title="t")
        assert os.path.getsize(path) > 10_000
        assert not model.training  # left in the mode it was in
    assert sorted(os.listdir(tmp_path)) == ["pFalse.png", "pTrue.png"]  # no temporary files left behind


def test_held_out_images_are_fixed_and_not_training_images():
    cfg = AIMv2Config.preset("tiny")
    first, again = held_out_set(ShapesDataset(32), cfg, 4), held_out_set(ShapesDataset(32), cfg, 4)
    assert all(torch.equal(a, b) for a, b in zip(first.images, again.images)) and first.captions == again.captions
    training = ShapesDataset(32, seed=0)
    assert [training.load(i)[1] for i in range(4)] != first.captions
