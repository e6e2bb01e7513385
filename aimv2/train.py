"""aimv2-train: AIMv2 pre-training (also `python -m aimv2.train`, and under torchrun).

    aimv2-train                                   # tiny preset, built-in shapes, a few CPU minutes
    aimv2-train --preset large --data shards/ --batch-size 2048 --grad-accum 8 --out runs/l
    torchrun --nproc_per_node=8 -m aimv2.train --preset large --data shards/ [--fsdp]
    aimv2-train --resume --out runs/l             # continue from the newest checkpoint
    aimv2-train --native-resolution               # images at their own sizes, packed by --max-tokens

One optimizer step consumes a global batch (--batch-size) split over processes and accumulation
micro-batches. Each micro-batch's loss is weighted by its share of the step's counted patches and
tokens, so the gradient is that of the global batch's token-mean loss whatever the split: one process,
two processes or accumulation give the same step (tests/test_distributed.py). Prefix lengths come from
a generator seeded by (seed, step), and augmentation from (seed, epoch, sample), so a resumed run
repeats an uninterrupted one exactly on CPU (on a GPU only with --deterministic). With
--native-resolution the step is filled to a patch budget instead of an image count (train_batches.py).

Output directory: metrics.jsonl, loss.png, predictions.png, checkpoints/step_*.pt (the newest K),
config.json. At every checkpoint and at the end the main process scores greedy captions of fixed
held-out images (caption_exact, caption_word_acc in metrics.jsonl) and redraws predictions.png.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch

import aimv2_kernels as ak

from . import checkpoint as ckpt
from .cli import UsageError
from .cli import run as run_command
from .config import AIMv2Config
from .data import BrokenDataError, CaptionDataset, ShapesDataset, load_tokenizer, native_transform_for, open_source, transform_for
from .distributed import DistInfo, all_reduce_sum, any_process, barrier, full_state, gradient_sync, init_distributed, load_full_state, shutdown, wrap_model
from .metrics import MetricsLog, read_metrics, summarize
from .model import AIMv2Model
from .optim import build_optimizer, build_scheduler
from .packing import PackedImages
from .predictions import HeldOut, caption_accuracy, draw_predictions, greedy_captions, held_out_set
from .regional_compile import compile_blocks
from .train_batches import NativeBatches, SquareBatches
from .train_config import TrainConfig, merge_for_resume, parse_args


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step (save, then exit cleanly); a
    second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the training process, which stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _say(info: DistInfo, *args) -> None:
    if info.is_main:
        print(*args, file=sys.stderr, flush=True)


def model_config_for(cfg: TrainConfig, tokenizer, source) -> AIMv2Config:
    """The preset with --model overrides, the tokenizer's vocabulary and pad id, and the caption
    length (--max-text-len; for built-in data at least the longest built-in caption)."""
    base = AIMv2Config.preset(cfg.preset, **{"native": cfg.native_resolution, **cfg.model})
    text_len = cfg.max_text_len or base.max_text_len
    if cfg.max_text_len is None and isinstance(source, ShapesDataset):
        text_len = max(text_len, source.max_caption_tokens(tokenizer))
    return dataclasses.replace(base, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, max_text_len=text_len)


def _prepare_out_dir(cfg: TrainConfig, info: DistInfo, resuming: bool) -> None:
    out = cfg.out_dir
    if info.is_main and not resuming and ckpt.list_checkpoints(out):
        if not cfg.overwrite:
            raise SystemExit(
                f"aimv2-train: {out} already holds checkpoints of an earlier run. Pass --resume to continue it, "
                "--overwrite to delete them and start afresh, or --out DIR to train elsewhere."
            )
        shutil.rmtree(ckpt.checkpoint_dir(out))
    if info.is_main:
        os.makedirs(out, exist_ok=True)
    barrier(info)


def _resolve_resume(cfg: TrainConfig) -> str | None:
    if cfg.resume is None:
        return None
    if cfg.resume != "latest":
        return cfg.resume
    path = ckpt.latest_checkpoint(cfg.out_dir)
    if path is None:
        raise SystemExit(f"aimv2-train: --resume found no checkpoint in {ckpt.checkpoint_dir(cfg.out_dir)}")
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _use_deterministic_algorithms(device: torch.device) -> None:
    """--deterministic: runs of the same options on the same machine compute the same bits, so a
    resumed run repeats an uninterrupted one on a GPU too. aimv2_kernels reads the setting at each
    call (its attention backward then sums dQ in a fixed order instead of with atomic adds)."""
    if device.type == "cuda":
        # cuBLAS gives reproducible results only with a fixed workspace. Torch reads this variable
        # once, at the process's first CUDA matmul: for the command that is still to come (the model
        # is built on the CPU); a caller of train() that already ran one must set it itself
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.are_deterministic_algorithms_enabled():  # a caller's own setting, strict or not, stands
        # warn_only: an op without a deterministic implementation (in torch or anything the run
        # calls) warns instead of raising, which would stop the run, perhaps hours in on a rare path
        torch.use_deterministic_algorithms(True, warn_only=True)


def _blank(inputs):
    """The same batch with every pixel at the (normalized) mean: zeros."""
    if isinstance(inputs, PackedImages):
        return PackedImages(torch.zeros_like(inputs.patches), inputs.grid, inputs.cu_seqlens)
    return torch.zeros_like(inputs)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.info = info
        resume_path = _resolve_resume(cfg)
        state = None
        if resume_path is not None:
            try:
                state = ckpt.load_checkpoint(resume_path)
            except ckpt.CheckpointError as exc:
                raise SystemExit(f"aimv2-train: {exc}") from exc
            cfg = merge_for_resume(state["train_config"], cfg)
        self.cfg = cfg
        if cfg.backend is not None:
            try:
                ak.set_backend(cfg.backend)
            except ValueError as exc:
                raise UsageError(f"--backend {cfg.backend!r}: {exc}") from exc
        if cfg.deterministic:  # here, after the merge: a resumed run keeps the stored option
            _use_deterministic_algorithms(info.device)

        # the tokenizer and the data before the output directory: a wrong path stops the run before
        # it creates or empties anything
        try:
            self.tokenizer = load_tokenizer(cfg.tokenizer)
        except FileNotFoundError as exc:  # a failure to read (exit status 1), named by its flag
            raise FileNotFoundError(f"--tokenizer: {exc}") from exc
        except ValueError as exc:
            raise UsageError(f"--tokenizer {cfg.tokenizer!r}: {exc}") from exc
        base = AIMv2Config(**state["model_config"]) if state else AIMv2Config.preset(cfg.preset, **cfg.model)
        self.max_patches = cfg.max_patches or base.num_patches
        native_sizes = dict(patch_size=base.patch_size, max_patches=self.max_patches) if cfg.native_resolution else {}
        try:
            self.source = open_source(cfg.data, base.image_size, cfg.seed, cfg.builtin_size, **native_sizes)
        except ValueError as exc:
            raise UsageError(str(exc) if "--data" in str(exc) else f"--data {cfg.data!r}: {exc}") from exc
        self.model_config = AIMv2Config(**state["model_config"]) if state else model_config_for(cfg, self.tokenizer, self.source)
        _prepare_out_dir(cfg, info, resuming=state is not None)
        _seed_everything(cfg.seed)  # same model init on every process

        model = AIMv2Model(self.model_config).to(info.device)
        self.raw_model = model
        self.model = wrap_model(model, info, fsdp=cfg.fsdp)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        self.step = 0
        self.skipped = 0
        if state is not None:
            self._restore(state, resume_path)
        if cfg.compile:
            compile_blocks(self.raw_model, dynamic=cfg.native_resolution)

        self.batches = self._make_batches(state)
        self.held_out = self._held_out()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and info.device.type == "cuda" else nullcontext())
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), resume_step=self.step if state else None) if info.is_main else None
        if info.is_main:
            with open(os.path.join(cfg.out_dir, "config.json"), "w", encoding="utf-8") as f:
                json.dump({"train": cfg.to_dict(), "model": dataclasses.asdict(self.model_config)}, f, indent=2)

    def _held_out(self) -> HeldOut | None:
        """The fixed held-out images, on the main process; none under FSDP, whose sharded parameters
        a single process cannot run."""
        cfg = self.cfg
        count = max(cfg.eval_samples, cfg.prediction_images)
        if not self.info.is_main or not count:
            return None
        if cfg.fsdp:
            _say(self.info, "aimv2-train: note: no held-out captions or predictions.png under --fsdp")
            return None
        held = held_out_set(self.source, self.model_config, count, self.max_patches)
        return held if held.images else None

    def _make_batches(self, state) -> SquareBatches | NativeBatches:
        cfg, c = self.cfg, self.model_config
        common = dict(seed=cfg.seed, grad_accum=cfg.grad_accum, info=self.info, pad_id=c.pad_id, workers=cfg.workers,
                      worker_init_fn=_ignore_sigint)
        if cfg.native_resolution:
            dataset = CaptionDataset(self.source, self.tokenizer, c.max_text_len,
                                     native_transform_for(self.source, c.patch_size, self.max_patches), cfg.seed)
            try:
                return NativeBatches(dataset, len(self.source), max_tokens=cfg.max_tokens or cfg.batch_size * c.num_patches,
                                     max_patches=self.max_patches, patch_size=c.patch_size,
                                     saved=state["data"] if state else None, **common)
            except ValueError as exc:  # a budget below one image (names the flag), a foreign checkpoint
                raise SystemExit(f"aimv2-train: {exc}") from exc
        dataset = CaptionDataset(self.source, self.tokenizer, c.max_text_len, transform_for(self.source, c.image_size), cfg.seed)
        return SquareBatches(dataset, len(self.source), global_batch=cfg.batch_size, num_patches=c.num_patches,
                             start_step=self.step, **common)

    def _restore(self, state: dict, path: str) -> None:
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped = int(state.get("metrics", {}).get("skipped", 0))
        data = state["data"]
        if not self.cfg.native_resolution and (data.get("dataset_size") != len(self.source) or data.get("batch_size") != self.cfg.batch_size):
            _say(self.info, "aimv2-train: warning: the data or batch size differ from the checkpoint's; the sample order will not continue exactly")
        _say(self.info, f"aimv2-train: resumed from {path} at step {self.step}")

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step. Returns the losses (weighted pixel, text: a (2,) float64 tensor) and the
        gradient norm as device tensors, which `_read` brings to the host: nothing here waits for the
        GPU except, with several processes, the global batch's counts."""
        cfg, info = self.cfg, self.info
        micro_batches = self.batches.next_step(self.step)
        # counted patches and caption tokens of the global batch, skipped samples, images (host ints)
        counts = [float(sum(m.pixels for m in micro_batches)), float(sum(m.words for m in micro_batches)),
                  float(sum(m.skipped for m in micro_batches)), float(sum(m.images for m in micro_batches))]
        if info.enabled:
            counts = all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=info.device), info).tolist()
        pixel_total, text_total, skipped, images = counts
        pixel_total, text_total = max(pixel_total, 1.0), max(text_total, 1.0)

        sums = torch.zeros(2, dtype=torch.float64, device=info.device)  # weighted pixel, text losses
        for m, batch in enumerate(micro_batches):
            # this micro-batch's share of the global batch's counted patches and tokens (host ints:
            # no device sync); x world because the gradient all-reduce averages over processes
            w_pixel = batch.pixels / pixel_total * info.world
            w_text = batch.words / text_total * info.world
            inputs = batch.inputs.to(info.device, non_blocking=True)
            tokens = batch.tokens.to(info.device, non_blocking=True)
            if cfg.blank_images:
                inputs = _blank(inputs)
            with gradient_sync(self.model, sync=m == cfg.grad_accum - 1):  # forward and backward
                with self.autocast:
                    loss = self.model(inputs, tokens, batch.prefix.to(info.device))
                    objective = self.model_config.alpha * loss.pixel * w_pixel + loss.text * w_text
                objective.backward()
            sums += torch.stack([loss.pixel.detach() * w_pixel, loss.text.detach() * w_text]).double() / info.world
        all_reduce_sum(sums, info)

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.skipped += int(skipped)
        return {"losses": sums, "grad_norm": grad_norm, "lr": lr, "images": int(images)}

    def _read(self, out: dict) -> dict:
        """A step's metrics on the host (waits for the GPU): only at steps that log or checkpoint."""
        pixel, text = out["losses"].tolist()
        return {"pixel_loss": pixel, "text_loss": text, "loss": self.model_config.alpha * pixel + text,
                "lr": out["lr"], "grad_norm": float(out["grad_norm"]), "images": out["images"]}

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self) -> str:
        model_state, optim_state = full_state(self.model, self.optimizer)
        data_state = self.batches.state(self.step)  # a collective for native runs: every process calls it
        path = ckpt.checkpoint_path(self.cfg.out_dir, self.step)
        if self.info.is_main:
            ckpt.save_checkpoint({
                "step": self.step,
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": ckpt.capture_rng_state(),
                "data": data_state,
                "train_config": self.cfg.to_dict(),
                "model_config": dataclasses.asdict(self.model_config),
                "metrics": {"skipped": self.skipped},
            }, path)
            ckpt.prune_checkpoints(self.cfg.out_dir, self.cfg.keep_checkpoints)
        barrier(self.info)
        return path

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg, info = self.cfg, self.info
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        _say(info, f"aimv2-train: preset {cfg.preset} ({n_params / 1e6:.2f}M parameters), data {self.source.describe()}, "
                   f"device {info.device}, {info.world} process(es), {self.batches.describe()}, steps {cfg.steps}, out {cfg.out_dir}")
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not (info.is_main and cfg.progress),
                   file=sys.stderr, mininterval=0.5)
        start_time = time.perf_counter()
        last_saved = self.step if cfg.resume else None
        stopped_by = None
        # images and wall time since the last logged step: the host waits for the GPU only there
        window_images, window_start = 0, time.perf_counter()
        with StopRequest() as stop:
            while self.step < cfg.steps:
                out = self.train_step()
                window_images += out["images"]
                checkpoint_now = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
                if self.step % cfg.log_every == 0 or checkpoint_now:  # the same steps on every process
                    record = self._read(out)  # waits for the step to finish: only here
                    now = time.perf_counter()
                    if not math.isfinite(record["loss"]):
                        raise FloatingPointError(f"the loss became {record['loss']} at step {self.step}; lower --lr or check the data")
                    record = {"step": self.step, **record, "images": window_images,
                              "samples_per_s": window_images / max(now - window_start, 1e-9),
                              "elapsed_s": now - start_time, "skipped": self.skipped}
                    window_images = 0
                    if info.is_main:
                        if checkpoint_now:
                            record.update(self.evaluate())
                        self.metrics.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.3f}", pix=f"{record['pixel_loss']:.3f}", txt=f"{record['text_loss']:.3f}",
                                        lr=f"{record['lr']:.2e}", img_s=f"{record['samples_per_s']:.0f}", refresh=False)
                    window_start = time.perf_counter()  # the evaluation's and the log's time is not the steps'

                bar.update(1)
                if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                    self.save()
                    last_saved = self.step
                if any_process(stop.signum is not None, info):
                    stopped_by = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                    break
        bar.close()
        if last_saved != self.step:
            path = self.save()
        else:
            path = ckpt.checkpoint_path(cfg.out_dir, self.step)
        summary = {"step": self.step, "checkpoint": path, "out_dir": cfg.out_dir, "stopped_by": stopped_by, "skipped": self.skipped}
        if info.is_main:
            self.metrics.close()
            if stopped_by:
                _say(info, f"aimv2-train: stopped by {stopped_by} at step {self.step}; checkpoint {path}; "
                           f"continue with: aimv2-train --resume --out {cfg.out_dir}")
            else:
                summary.update(self._report())
        return summary

    # ---- held-out predictions ---------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Caption accuracy of greedy decoding on the held-out set, and predictions.png (main process)."""
        cfg, held = self.cfg, self.held_out
        if held is None:
            return {}
        out = {}
        model = self.raw_model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast:
                captions = None
                if cfg.eval_samples:
                    n = min(cfg.eval_samples, len(held.images))
                    captions = greedy_captions(model, held.images[:n], self.tokenizer)
                    out = {**caption_accuracy(captions, held.captions[:n]), "eval_samples": n}
                if cfg.prediction_images:
                    draw_predictions(model, held, self.tokenizer, os.path.join(cfg.out_dir, "predictions.png"),
                                     rows=cfg.prediction_images, title=f"{cfg.out_dir}, step {self.step}",
                                     captions=captions)  # the pictured images' captions: decoded once
        finally:
            model.train(was_training)
        return out

    def _report(self) -> dict:
        """Print first-vs-last losses and draw loss.png."""
        from .plot import plot_runs

        records = read_metrics(os.path.join(self.cfg.out_dir, "metrics.jsonl"))
        out = {}
        lines = []
        for key in ("loss", "pixel_loss", "text_loss"):
            pair = summarize(records, key)
            if pair:
                first, last = pair
                out[key] = {"first": first, "last": last}
                lines.append(f"{key} {first:.4f} -> {last:.4f} ({(last - first) / first * 100:+.1f}%)")
        plot = plot_runs([self.cfg.out_dir])
        scored = [r for r in records if r.get("caption_exact") is not None]
        if scored:
            last = scored[-1]
            out["caption_exact"], out["caption_word_acc"] = last["caption_exact"], last["caption_word_acc"]
            lines.append(f"held-out captions (greedy, {last['eval_samples']} samples): {last['caption_exact'] * 100:.1f}% "
                         f"exact, {last['caption_word_acc'] * 100:.1f}% of words")
        if self.skipped:
            lines.append(f"{self.skipped} unreadable sample(s) skipped")
        _say(self.info, "aimv2-train: done. " + "; ".join(lines) + " (means of the first and last 10 logged steps)")
        pictures = os.path.join(self.cfg.out_dir, "predictions.png")
        written = [os.path.join(self.cfg.out_dir, "metrics.jsonl"), plot] + ([pictures] if os.path.isfile(pictures) else [])
        _say(self.info, f"aimv2-train: wrote {', '.join(written)}, {ckpt.checkpoint_dir(self.cfg.out_dir)}")
        out["loss_png"] = plot
        return out


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary (final step, checkpoint, losses)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed(cfg.device)
    # --deterministic changes a process-wide setting: a caller of train() gets its own back
    determinism = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        return Trainer(cfg, info).run()
    finally:
        torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
        shutdown(info)


def _restart_with_passive_openmp() -> None:
    """On a CPU-only machine, re-run this command once with OMP_WAIT_POLICY=PASSIVE.

    Torch's OpenMP threads spin while they wait for each other. When anything else shares the
    cores (a loader worker, another program), the spinning steals the time slices the working
    threads need, and a step of the tiny preset on two cores measured 5-7 s instead of 0.4 s.
    libgomp reads the policy only when it is loaded, which happens with `import torch`, before this
    module runs; so the only way to set it for the console script is a fresh process.
    """
    if "OMP_WAIT_POLICY" in os.environ or torch.cuda.is_available() or torch.get_num_threads() < 2:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "aimv2.train", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0, or 2 / 1 with one line for a bad option / a failed run (aimv2.cli)."""
    if argv is None:
        _restart_with_passive_openmp()
    cfg = parse_args(argv)  # a bad option: one line, exit status 2

    def body() -> int:
        train(cfg)
        return 0

    return run_command("aimv2-train", body, argv, failures=(BrokenDataError, FloatingPointError))


if __name__ == "__main__":
    sys.exit(main())
