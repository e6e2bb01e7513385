"""One AIMv2 training step (forward, backward, AdamW) for the large preset, bf16 autocast.

Models: ours (`aimv2.AIMv2Model`, backend "auto"), ours on the "cuda" backend (the CUDA C++ kernels,
attention included, beside the Triton ones "auto" picks today, so "auto" can be set from the figures),
the eager reference
(`aimv2.reference_model.ReferenceAIMv2Model`: torch.nn.RMSNorm, SDPA with a dense prefix mask,
materialized logits), and that reference under torch.compile. All run at one batch size: the
largest of a candidate list that the eager reference fits (it needs the most memory), so images/s
compare like with like. MFU uses the model FLOPs counted in `model_flops_per_image`, against the
matmul rate measured in the run (% of roof) and the datasheet (MFU); peak MiB is all memory at the
step's peak (weights, AdamW state, activations), not only what a call adds. Our models also report
one profiled step's time by kernel class (benchmarks/step_breakdown.py).
"""
from __future__ import annotations

import torch

from . import step_breakdown
from .attention import visible_pairs
from .harness import Context, Result, free_memory, time_loop_ms
from .targets import Verdict, speedup_vs

NAME = "step"
X_LABEL = "batch size"
PRESET, SMOKE_PRESET = "large", "tiny"
# Quick runs probe one batch size (each probe builds the reference and runs a step: seconds apiece).
BATCHES, BATCHES_QUICK, SMOKE_BATCHES = (512, 384, 256, 192, 128, 96, 64, 32, 16), (128,), (4,)
# The question first: the eager reference, then ours; then the cuda backend; then both compiled
# (slow to build: a run cut short by its time limit loses those only).
MODELS = ("reference", "ours", "ours-cuda", "reference+compile", "ours+compile")
# the aimv2_kernels backend each of our models runs under
BACKENDS = {"ours": "auto", "ours-cuda": "cuda", "ours+compile": "auto"}
STEP_DTYPE = {False: "bfloat16 autocast", True: "float32"}  # by ctx.smoke: autocast runs only on CUDA
# Dense bf16 tensor-core peak of the datasheets (SXM parts), for MFU; other cards report MFU against
# the matmul rate measured in this run.
DATASHEET_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def matmul_macs_per_image(c) -> dict[str, float]:
    """Multiply-accumulates of one image's forward in every weight matmul, by part: the patch
    embedding, the encoder blocks (q, k, v, out projections and the three SwiGLU matmuls per token),
    the decoder blocks over [N image | BOS | T text] tokens, the image projection and the heads
    (pixel head on the N - 1 predicting positions, text head on the T text positions)."""
    N, P, T = c.num_patches, c.patch_dim, c.max_text_len
    S = N + 1 + T

    def block(dim: int, hidden: int) -> int:
        return 4 * dim * dim + 3 * dim * hidden

    return {
        "patch_embed": N * P * c.enc_dim,
        "encoder": c.enc_depth * N * block(c.enc_dim, c.enc_hidden),
        "decoder": c.dec_depth * S * block(c.dec_dim, c.dec_hidden),
        "heads": N * c.enc_dim * c.dec_dim + (N - 1) * c.dec_dim * P + T * c.dec_dim * c.vocab_size,
    }


def attention_macs_per_image(c, prefix: torch.Tensor) -> float:
    """Multiply-accumulates of one image's forward in attention's q.k and p.v, over visible (query,
    key) pairs only: prefix-causal in the encoder (averaged over this batch's prefixes), causal in
    the decoder."""
    N, S, B = c.num_patches, c.num_patches + 1 + c.max_text_len, prefix.numel()
    encoder = c.enc_depth * c.enc_dim * visible_pairs(prefix, 1, N, "prefix") / B
    decoder = c.dec_depth * c.dec_dim * visible_pairs(prefix, 1, S, "causal") / B
    return 2 * (encoder + decoder)


def model_flops_per_image(c, prefix: torch.Tensor) -> float:
    """Model FLOPs of one training step per image: 2 FLOPs per multiply-accumulate, and 3 times the
    forward's (the backward computes two products per forward product). Norms, activations,
    softmax, the loss's elementwise work and the optimizer are not counted."""
    return 3 * 2 * (sum(matmul_macs_per_image(c).values()) + attention_macs_per_image(c, prefix))


def datasheet_tflops(gpu_name: str):
    for key, value in DATASHEET_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in gpu_name:
            return value
    return None


def _batch(c, size: int, device: torch.device):
    gen = torch.Generator().manual_seed(size)
    images = torch.randn(size, c.channels, c.image_size, c.image_size, generator=gen).to(device)
    tokens = torch.randint(1, c.vocab_size, (size, c.max_text_len), generator=gen)
    tokens[:, -(c.max_text_len // 4):] = c.pad_id  # captions shorter than T: padding the loss ignores
    prefix = torch.randint(1, c.num_patches, (size,), generator=gen)
    return images, tokens.to(device), prefix.to(device)


def _is_ours(kind: str) -> bool:
    return kind.startswith("ours")


def _build(kind: str, c, device: torch.device):
    """The model, what a step calls (the model or its compiled wrapper), and its optimizer. Ours
    compiles as `aimv2-train --compile` does, block by block; the reference as a whole model."""
    from aimv2 import AIMv2Model
    from aimv2.reference_model import ReferenceAIMv2Model
    from aimv2.regional_compile import compile_blocks

    with device:  # build on the device: initializing ~0.5B parameters on the CPU takes long
        model = (AIMv2Model if _is_ours(kind) else ReferenceAIMv2Model)(c).train()
    forward = model
    if kind == "ours+compile":
        compile_blocks(model, dynamic=False)
    elif kind.endswith("+compile"):
        forward = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, forward, opt


def _step_fn(forward, opt, batch, device: torch.device):
    images, tokens, prefix = batch

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(images, tokens, prefix).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _fits(c, size: int, device: torch.device) -> bool:
    """One eager-reference step at this batch size runs without running out of memory."""
    try:
        model, forward, opt = _build("reference", c, device)
        _step_fn(forward, opt, _batch(c, size, device), device)()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model = forward = opt = None
        free_memory()


def largest_batch(c, candidates, device: torch.device):
    return next((b for b in candidates if _fits(c, b, device)), None)


def run(ctx: Context, log=print) -> list[Result]:
    try:
        from aimv2 import AIMv2Config
    except ImportError as exc:
        return [Result(NAME, "train_step", "fwd+bwd+adamw", "-", 0, kind, _is_ours(kind), True,
                       note=f"skipped: the aimv2 package does not import ({exc})") for kind in MODELS]
    c = AIMv2Config.preset(SMOKE_PRESET if ctx.smoke else PRESET)
    candidates = SMOKE_BATCHES if ctx.smoke else (BATCHES_QUICK if ctx.quick else BATCHES)
    size = largest_batch(c, candidates, ctx.device)
    results = []
    for kind in MODELS:
        r = Result(NAME, "train_step", "fwd+bwd+adamw", f"{PRESET if not ctx.smoke else SMOKE_PRESET} B{size}",
                   size or 0, kind, _is_ours(kind), True, unit="img/s", dtype=STEP_DTYPE[ctx.smoke])
        if size is None:
            r.note = f"no batch in {candidates} fits"
        elif kind.endswith("+compile") and ctx.smoke:
            r.note = "skipped: torch.compile is not built in the CPU smoke run"
        elif _backend_missing(kind):
            r.note = f"skipped: {_backend_missing(kind)}"
        else:
            _measure(ctx, c, kind, size, r)
        log(f"  train_step {r.size} {kind}: {f'{r.ms:.1f} ms' if r.ms else r.note}")
        results.append(r)
        ctx.on_result(r)
    return results


def _backend_missing(kind: str) -> str | None:
    """Why the backend a model needs cannot run here, or None."""
    import aimv2_kernels as ak

    backend = BACKENDS.get(kind, "auto")
    reason = None if backend == "auto" else ak.unavailable_reason(backend)
    return None if reason is None else f"{backend} backend unavailable ({reason})"


def _measure(ctx: Context, c, kind: str, size: int, r: Result) -> None:
    import aimv2_kernels as ak

    with ak.use_backend(BACKENDS.get(kind, "auto")):
        _measure_on_backend(ctx, c, kind, size, r)


def _measure_on_backend(ctx: Context, c, kind: str, size: int, r: Result) -> None:
    warmup, iters = (1, 2) if ctx.smoke else ((2, 5) if ctx.quick else (3, 20))
    try:
        model, forward, opt = _build(kind, c, ctx.device)
        batch = _batch(c, size, ctx.device)
        step = _step_fn(forward, opt, batch, ctx.device)
        r.ms = time_loop_ms(step, ctx.device, warmup=warmup, iters=iters)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
            step()
            r.peak_mib = torch.cuda.max_memory_allocated(ctx.device) / 2**20
        breakdown = step_breakdown.time_by_class(step, ctx.device) if _is_ours(kind) else None
        flops = model_flops_per_image(c, batch[2].cpu())
    except Exception as exc:  # noqa: BLE001 - one model's failure must not end the run
        r.ms, r.note = None, f"failed: {type(exc).__name__}: {str(exc).strip()[:160]}"
        return
    finally:
        model = forward = opt = step = None
        free_memory()
    r.metric = size / (r.ms * 1e-3)
    achieved = flops * r.metric / 1e12  # TFLOP/s
    r.roof_frac = achieved / ctx.card.matmul_tflops
    peak = datasheet_tflops(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
    r.extra = {"model TFLOP/s": f"{achieved:.3g}", "MFU": f"{100 * achieved / peak:.1f}%" if peak else "-"}
    if breakdown is not None:
        r.extra["time by kernel class"] = step_breakdown.summary(breakdown)


def targets(results: list[Result]) -> list[Verdict]:
    mode = "fwd+bwd+adamw"
    return [
        speedup_vs(results, NAME, "train_step", mode, "reference", 1.3, "AIMv2-L step vs eager reference"),
        speedup_vs(results, NAME, "train_step", mode, "reference+compile", 1.1,
                   "AIMv2-L step vs reference under torch.compile"),
    ]
