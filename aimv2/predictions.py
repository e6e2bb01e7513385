"""What the model predicts, on a fixed set of held-out images: pictures and caption accuracy.

    held = held_out_set(source, tokenizer, config, count=256)
    captions = greedy_captions(model, held.images, tokenizer)        # strings, by greedy decoding
    caption_accuracy(captions, held.captions)                        # {"caption_exact", "caption_word_acc"}
    draw_predictions(model, held, tokenizer, "predictions.png", rows=8)

The held-out images are the same every time (a pure function of the data and the seed), so the
pictures of one run, and of runs with the same data, compare. For the built-in data they come from
a seed training never uses, so they are truly held out; for real data they are the first samples of
the source (unreadable ones skipped), centre-cropped (or, at native resolution, fitted to the patch
budget), without any random augmentation.

Everything runs in eval mode: the encoder with the evaluation prefix (config.eval_prefix_len, else
half of each image's patches), as the validation loss uses it, so a picture shows the model as
trained: bidirectional over the prefix, causal after it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import AIMv2Config
from .data import EvalTransform, NativeNormalize, NativeTransform, ShapesDataset
from .data.loader import MAX_CONSECUTIVE_FAILURES
from .data.transforms import MEAN, STD
from .packing import PackedImages
from .patchify import patchify, unpatchify

# Seed of the built-in held-out images: never a training seed (those are small), nor the probe's.
HELD_OUT_SEED = 2_000_000_011


@dataclass
class HeldOut:
    images: list[Tensor]  # (C, H_i, W_i) normalized pixels
    captions: list[str]


def held_out_set(source, config: AIMv2Config, count: int, max_patches: int | None = None) -> HeldOut:
    """`count` fixed images and their captions (see the module doc), sized for `config`."""
    if isinstance(source, ShapesDataset):
        native = dict(patch_size=config.patch_size, max_patches=max_patches or config.num_patches) if config.native else {}
        source = ShapesDataset(config.image_size, seed=HELD_OUT_SEED, length=count, **native)
        transform = NativeNormalize(config.patch_size) if config.native else EvalTransform(config.image_size)
    elif config.native:
        transform = NativeTransform(config.patch_size, max_patches or config.num_patches, flip=False)
    else:
        transform = EvalTransform(config.image_size)
    images, captions = [], []
    failed = 0  # in a row: as many as make training call the data broken end the search (not the run)
    for index in range(len(source)):
        if len(images) == count or failed == MAX_CONSECUTIVE_FAILURES:
            break
        try:
            image, caption = source.load(index)
            pixels = transform(image, None)
        except Exception:  # an unreadable sample (training skips it too): take the next one
            failed += 1
            continue
        failed = 0
        images.append(pixels)
        captions.append(caption)
    return HeldOut(images, captions)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _encode(model, images: list[Tensor]):
    """Eval-mode encoder features and a `decode(tokens) -> (pixel_pred, text_hidden)` for them:
    packed for a native model (images of any sizes), batched otherwise."""
    device, c = _model_device(model), model.config
    if c.native:
        packed = PackedImages.from_images(images, c.patch_size).to(device)
        prefix = torch.tensor(_eval_prefixes(c, images), device=device)
        features = model.encoder(packed, prefix)
        return prefix, lambda tokens: model.decoder.forward_packed(features, packed.lengths, tokens)
    prefix = torch.tensor(_eval_prefixes(c, images), device=device)
    features = model.encoder(torch.stack(images).to(device), prefix)
    return prefix, lambda tokens: model.decoder(features, tokens)


def _eval_prefixes(c: AIMv2Config, images: list[Tensor]) -> list[int]:
    """Each image's evaluation prefix: config.eval_prefix_len, else half of its patches."""
    counts = [_patches(image, c.patch_size) for image in images]
    return [n // 2 if c.eval_prefix_len is None else min(c.eval_prefix_len, n) for n in counts]


@torch.no_grad()
def greedy_tokens(model, images: list[Tensor], eos_id: int, pad_id: int, batch_size: int = 256) -> Tensor:
    """(n, T) token ids written by greedy decoding from each image, pad_id after the first eos.

    Square models decode incrementally (the decoder's key/value cache: one row per image and
    token); native ones run the packed decoder over all tokens so far at each token."""
    c = model.config
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        tokens = torch.full((n, c.max_text_len), pad_id, dtype=torch.long, device=_model_device(model))
        finished = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        if c.native:
            _, decode = _encode(model, chunk)
            # text_hidden[:, k] sees BOS and tokens < k only (causal): the placeholder at k is unseen
            hidden_at = lambda k: decode(tokens[:, : k + 1])[1][:, k]  # noqa: E731
        else:
            prefix = torch.tensor(_eval_prefixes(c, chunk), device=tokens.device)
            features = model.encoder(torch.stack(chunk).to(tokens.device), prefix)
            first, cache = model.decoder.start_decoding(features)
            hidden_at = lambda k: first if k == 0 else model.decoder.decode_next(tokens[:, k - 1], cache)  # noqa: E731
        for k in range(c.max_text_len):
            step = model.decoder.text_logits(hidden_at(k)).argmax(-1)
            tokens[:, k] = torch.where(finished, pad_id, step)
            finished |= step == eos_id
            if bool(finished.all()):
                break
        out.append(tokens.cpu())
    return torch.cat(out)


def decode_captions(tokens: Tensor, tokenizer) -> list[str]:
    """Token rows -> strings, each cut at its first eos."""
    texts = []
    for row in tokens.tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode([t for t in row if t != tokenizer.pad_id]))
    return texts


def greedy_captions(model, images: list[Tensor], tokenizer) -> list[str]:
    return decode_captions(greedy_tokens(model, images, tokenizer.eos_id, tokenizer.pad_id), tokenizer)


def caption_accuracy(predicted: list[str], truth: list[str]) -> dict[str, float]:
    """caption_exact: the share of captions written exactly; caption_word_acc: the share of true
    words matched at their position (a missing or extra word counts against)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many predicted as true captions (and at least one), got {len(predicted)} and {len(truth)}")
    exact = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    words = sum(len(t.split()) for t in truth)
    right = sum(sum(a == b for a, b in zip(p.split(), t.split())) for p, t in zip(predicted, truth))
    return {"caption_exact": exact, "caption_word_acc": right / max(words, 1)}


@torch.no_grad()
def predicted_pixels(model, image: Tensor, prefix_len: int) -> Tensor:
    """(C, H, W): the image with every patch from `prefix_len` on replaced by the model's prediction,
    mapped back to pixels with the true patch's own mean and standard deviation (the loss compares
    with per-patch normalized targets, so that is the scale the prediction lives in)."""
    return _predicted_pixels(model, [image], [prefix_len])[0]


@torch.no_grad()
def _predicted_pixels(model, images: list[Tensor], prefixes: list[int]) -> list[Tensor]:
    """predicted_pixels of several images: square ones in one encoder and decoder call."""
    c, device = model.config, _model_device(model)
    no_text = torch.zeros(len(images), 1, dtype=torch.long, device=device)
    if c.native:  # images of their own sizes: one at a time
        preds = []
        for image, m in zip(images, prefixes):
            packed = PackedImages.from_images([image], c.patch_size).to(device)
            features = model.encoder(packed, torch.tensor([m], device=device))
            preds.append(model.decoder.forward_packed(features, packed.lengths, no_text[:1])[0])
    else:
        features = model.encoder(torch.stack(images).to(device), torch.tensor(prefixes, device=device))
        preds = model.decoder(features, no_text)[0]  # (n, N - 1, P)
    return [_rebuild(image, pred, m, c) for image, pred, m in zip(images, preds, prefixes)]


def _rebuild(image: Tensor, pixel_pred: Tensor, prefix_len: int, c: AIMv2Config) -> Tensor:
    """The image with patches from prefix_len on taken from pixel_pred (N - 1, P), rescaled."""
    p = c.patch_size
    h, w = image.shape[1] // p, image.shape[2] // p
    target = patchify(image.unsqueeze(0).float(), p)[0]  # (N, P)
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + c.norm_pix_eps).sqrt()
    rebuilt = target.clone()
    rebuilt[1:] = pixel_pred.float().cpu() * std[1:] + mean[1:]  # position i predicts patch i + 1
    rebuilt[:prefix_len] = target[:prefix_len]
    return unpatchify(rebuilt.unsqueeze(0), p, c.channels, grid=(h, w))[0]


def _to_rgb(image: Tensor):
    """(3, H, W) normalized -> (H, W, 3) numpy in [0, 1]."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _dimmed_after(image: Tensor, prefix_len: int, patch_size: int) -> Tensor:
    """The image with the patches the encoder did not see bidirectionally (index >= prefix) greyed."""
    patches = patchify(image.unsqueeze(0), patch_size)[0].clone()
    patches[prefix_len:] = patches[prefix_len:] * 0.25  # towards the mean (0 after normalization)
    p = patch_size
    return unpatchify(patches.unsqueeze(0), p, image.shape[0], grid=(image.shape[1] // p, image.shape[2] // p))[0]


@torch.no_grad()
def draw_predictions(model, held: HeldOut, tokenizer, path: str, rows: int = 8, title: str = "",
                     captions: list[str] | None = None) -> str:
    """predictions.png: per held-out image, the input, the prefix the encoder saw bidirectionally,
    the next-patch predictions for the rest, and the greedy caption beside the true one.

    captions: the greedy captions of the first held-out images when the caller has them already
    (the trainer scores them just before); decoded here otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.training
    model.eval()
    try:
        images = held.images[:rows]
        c = model.config
        prefix = _eval_prefixes(c, images)
        if captions is None or len(captions) < len(images):
            captions = greedy_captions(model, images, tokenizer)
        predicted = _predicted_pixels(model, images, prefix)
        fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.3 * len(images)), squeeze=False)
        for i, image in enumerate(images):
            m = prefix[i]
            panels = (image, _dimmed_after(image, m, c.patch_size), predicted[i])
            names = ("input", "prefix (seen bidirectionally)", "next-patch predictions")
            for ax, panel, name in zip(axes[i], panels, names):
                ax.imshow(_to_rgb(panel), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(name, fontsize=9)
            axes[i][1].set_xlabel(f"{m} of {_patches(image, c.patch_size)} patches", fontsize=7)
            mark = "=" if captions[i] == held.captions[i] else "x"
            axes[i][2].set_xlabel(f"true: {_printable(held.captions[i])}\nmodel {mark} {_printable(captions[i])}",
                                  fontsize=7, loc="right")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.985 if title else 1))
        return _save_atomically(fig, path)
    finally:
        plt.close("all")
        model.train(was_training)


def _patches(image: Tensor, patch_size: int) -> int:
    return (image.shape[1] // patch_size) * (image.shape[2] // patch_size)


def _printable(text: str) -> str:
    """An untrained decoder writes any bytes: show control characters as '?' rather than missing glyphs."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _save_atomically(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename: give the usual mode
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
