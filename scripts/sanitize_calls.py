"""One small forward and backward call of every public op on every available GPU backend, for memcheck.

    compute-sanitizer --tool memcheck python scripts/sanitize_calls.py    # on a GPU
    python scripts/sanitize_calls.py --cpu                                 # the same calls, interpreter
    compute-sanitizer --tool racecheck python scripts/sanitize_calls.py --backend cuda \
        --only prefix_causal_attention,linear_cross_entropy                # shared-memory races, CUDA C++

Numerics are the tests' business; this script exists so that compute-sanitizer sees each kernel once
at sizes that stress bounds checks: odd sizes (no power of two, no multiple of a tile), bf16, and
attention with a per-sample prefix (plus fp32 at D = 64, whose tiles take twice the bytes). Each call
is followed by torch.cuda.synchronize(), so an asynchronous fault is reported against the call that
caused it. One line per (backend, op): `call BACKEND OP DETAILS: ok` or the exception (traceback on
stderr); exit code 1 if any call failed. Under memcheck, compute-sanitizer's own --error-exitcode
reports memory errors.

AIMV2_KERNELS_AUTOTUNE defaults to 0 here: the autotuner would benchmark every candidate, each launch
many times slower under memcheck. --cpu runs CPU tensors through the triton backend with
TRITON_INTERPRET=1, set before triton is imported, so the plumbing is checkable without a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if "--cpu" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, so before the imports below
os.environ.setdefault("AIMV2_KERNELS_AUTOTUNE", "0")
sys.path.insert(0, str(ROOT))  # a checkout works without an install

import torch  # noqa: E402

import aimv2_kernels as ak  # noqa: E402
from aimv2_kernels import backend  # noqa: E402

BF16 = torch.bfloat16

# op name -> the registry kernels its forward and backward resolve, to say which implementation ran
# when a backend lacks one (an explicit "cuda" falls back to "triton" for attention and the CE).
KERNELS = {
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
    "rms_norm_residual": ("rms_norm_residual_fwd", "rms_norm_bwd"),
    "swiglu": ("swiglu_fwd", "swiglu_bwd"),
    "swiglu_packed": ("swiglu_packed_fwd", "swiglu_packed_bwd"),
    "prefix_causal_attention": ("attention_fwd", "attention_bwd"),
    "patch_mse_loss": ("patch_mse_fwd", "patch_mse_bwd"),
    "linear_cross_entropy": ("linear_ce",),
    "aimv2_loss": ("patch_mse_fwd", "patch_mse_bwd", "linear_ce"),
}


def _leaf(shape, device, dtype=BF16) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_()


def _backward(outputs: tuple[torch.Tensor, ...]) -> None:
    """Backward of every output with a random upstream gradient (scalars: 1)."""
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outputs]
    torch.autograd.backward(list(outputs), grads)


# ---- the calls: each builds its inputs, runs forward and backward ---------------------------------

def call_rms_norm(device) -> None:
    x, w = _leaf((3, 37, 203), device), _leaf((203,), device)
    _backward((ak.rms_norm(x, w),))


def call_rms_norm_residual(device) -> None:
    x, r, w = _leaf((3, 37, 203), device), _leaf((3, 37, 203), device), _leaf((203,), device)
    _backward(ak.rms_norm_residual(x, r, w))


def call_rms_norm_residual_fp32_stream(device) -> None:
    """The autocast case: a bf16 update added to a float32 residual stream (mixed-dtype kernels)."""
    x, r, w = _leaf((3, 37, 203), device), _leaf((3, 37, 203), device, torch.float32), _leaf((203,), device)
    _backward(ak.rms_norm_residual(x, r, w))


def call_swiglu(device) -> None:
    gate, up = _leaf((3, 37, 181), device), _leaf((3, 37, 181), device)
    _backward((ak.swiglu(gate, up),))


def call_swiglu_packed(device) -> None:
    x = _leaf((3, 37, 2 * 181), device)  # H = 181: the up half starts off any 16-byte boundary
    _backward((ak.swiglu_packed(x),))


def attention_call(head_dim: int, dtype: torch.dtype) -> Callable:
    def call(device) -> None:
        q, k, v = (_leaf((2, 3, 67, head_dim), device, dtype) for _ in range(3))  # (B, H, S, D)
        prefix = torch.tensor([5, 66], dtype=torch.int32, device=device)  # per sample: short, S - 1
        _backward((ak.prefix_causal_attention(q, k, v, prefix),))
    return call


def _patch_inputs(device):
    """pred, target (2, 37, 147) and a mask that counts some patches of each sample."""
    pred, target = _leaf((2, 37, 147), device), torch.randn(2, 37, 147, device=device, dtype=BF16)
    mask = torch.rand(2, 37, device=device) < 0.6
    mask[:, 0] = True
    return pred, target, mask


def _text_inputs(device):
    """hidden (2, 29, 200), weight (1001, 200), labels with every third one ignored."""
    hidden, weight = _leaf((2, 29, 200), device), _leaf((1001, 200), device)
    labels = torch.randint(0, 1001, (2, 29), device=device)
    labels[:, ::3] = -100
    return hidden, weight, labels


def call_patch_mse_loss(device) -> None:
    pred, target, mask = _patch_inputs(device)
    _backward((ak.patch_mse_loss(pred, target, mask),))


def call_linear_cross_entropy(device) -> None:
    hidden, weight, labels = _text_inputs(device)
    _backward((ak.linear_cross_entropy(hidden, weight, labels),))


def call_aimv2_loss(device) -> None:
    pred, target, mask = _patch_inputs(device)
    hidden, weight, labels = _text_inputs(device)
    _backward((ak.aimv2_loss(pred, target, mask, hidden, weight, labels).total,))


CALLS: list[tuple[str, str, Callable]] = [  # (op, details, call)
    ("rms_norm", "bf16", call_rms_norm),
    ("rms_norm_residual", "bf16", call_rms_norm_residual),
    ("rms_norm_residual", "bf16 + fp32 stream", call_rms_norm_residual_fp32_stream),
    ("swiglu", "bf16", call_swiglu),
    ("swiglu_packed", "bf16", call_swiglu_packed),
    ("prefix_causal_attention", "bf16 D=64", attention_call(64, BF16)),
    ("prefix_causal_attention", "bf16 D=128", attention_call(128, BF16)),
    ("prefix_causal_attention", "fp32 D=64", attention_call(64, torch.float32)),
    ("patch_mse_loss", "bf16", call_patch_mse_loss),
    ("linear_cross_entropy", "bf16", call_linear_cross_entropy),
    ("aimv2_loss", "bf16", call_aimv2_loss),
]


# ---- running them ---------------------------------------------------------------------------------

def _implementations(op: str, device: torch.device) -> str:
    """Which backends the op's kernels resolve to under the current choice, e.g. "triton"."""
    names = sorted({backend.resolve(kernel, device)[0] for kernel in KERNELS[op]})
    return "+".join(names)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(name: str, op: str, details: str, call: Callable, device: torch.device) -> bool:
    """One (backend, op) line; True when the call and its synchronize raised nothing."""
    label = f"call {name} {op} {details}"
    try:
        with ak.use_backend(name):
            ran = _implementations(op, device)
            call(device)
            _synchronize(device)
    except Exception as exc:  # report and go on: one broken op must not hide the others
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"{label}: FAILED {type(exc).__name__}: {message}", flush=True)
        traceback.print_exc(file=sys.stderr)
        return False
    note = "" if ran == name else f" (runs {ran})"
    print(f"{label}{note}: ok", flush=True)
    return True


def backends_to_check(cpu: bool, only: str | None = None) -> list[str]:
    """triton and cuda (or just `only`) where they can run; unavailable ones are reported and skipped."""
    wanted = [only] if only else (["triton"] if cpu else ["triton", "cuda"])
    available = []
    for name in wanted:
        reason = ak.unavailable_reason(name)
        if reason is None:
            available.append(name)
        else:
            print(f"skip {name}: {reason}", flush=True)
    return available


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="CPU tensors through the triton backend in TRITON_INTERPRET=1 (no GPU needed)")
    parser.add_argument("--backend", choices=("triton", "cuda"), help="check this backend only")
    parser.add_argument("--only", help="comma-separated op names to call (default: all)")
    args = parser.parse_args(argv)
    ops = set(args.only.split(",")) if args.only else {op for op, _, _ in CALLS}
    unknown = ops - {op for op, _, _ in CALLS}
    if unknown:
        parser.error(f"unknown op(s) {sorted(unknown)}; choose from {sorted({op for op, _, _ in CALLS})}")
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU (under compute-sanitizer), or pass --cpu", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.manual_seed(0)
    names = backends_to_check(args.cpu, args.backend)
    if not names:
        print("no backend to check", file=sys.stderr)
        return 1
    results = [run_one(name, op, details, call, device) for name in names for op, details, call in CALLS if op in ops]
    failed = results.count(False)
    print(f"{len(results) - failed} of {len(results)} calls ok on {', '.join(names)} ({device.type})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
