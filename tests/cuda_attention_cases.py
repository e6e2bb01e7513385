"""What the GPU tests of the two CUDA C++ attention paths share: tests/test_cuda_attention.py (sm_80,
ops `cuda_attention_fwd_sm80` / `cuda_attention_bwd_sm80`, and the varlen ops
`cuda_attention_varlen_{fwd,bwd}_sm80`) and tests/test_cuda_attention_sm90.py (Hopper, `..._sm90`).
The sizes and cases, q/k/v and prefix builders, NaN-filled gradient buffers, the float64 reference
and FlashAttention's tolerance rule; `AttentionPath` holds what differs between the two paths: op
names, the GPUs that run them, and the lse bound.

Packed variable-length sequences (T, H, D): the float64 reference is the "torch" backend's varlen
forward and backward run in float64, the low-dtype baseline PyTorch's attention on each sequence
alone.

FlashAttention's rule: against the float64 reference (`reference.prefix_causal_attention_with_lse`,
gradients by autograd), the kernel's error -- relative error norm and worst element -- is at most
twice that of PyTorch computing the same attention in the low dtype, plus a FLOOR of 1e-3.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from helpers import max_abs_err, rel_err

from aimv2_kernels import reference as ref

B, H = 2, 3
DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
SEQ_LENS = (1, 7, 67, 130, 256, 1024)
PREFIXES = ("0", "1", "S-1", "S", "S+5", "random", "none")
FLOOR = 1e-3


def accuracy_grid(*, prefixes: bool):
    """Parametrizes a test over DTYPES, HEAD_DIMS, SEQ_LENS and, with prefixes, PREFIXES (test ids like
    `[torch.bfloat16-64-7-S+5]`): the grid both paths are checked on."""
    def parametrize(test):
        test = pytest.mark.parametrize("dtype", DTYPES, ids=str)(test)
        test = pytest.mark.parametrize("D", HEAD_DIMS)(test)
        test = pytest.mark.parametrize("S", SEQ_LENS)(test)
        return pytest.mark.parametrize("prefix_kind", PREFIXES)(test) if prefixes else test
    return parametrize


# ---- inputs ----------------------------------------------------------------------------------------

def make_qkv(S, D, dtype, layout="packed", seed=0):
    """q, k, v (B, H, S, D): the (B, H, S, D) views of one (B, S, 3, H, D) projection ("packed"),
    contiguous tensors ("contiguous"), or views whose rows start off 16-byte boundaries ("odd")."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "packed":
        qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=gen).to(dtype)
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))
    if layout == "odd":
        return odd_views(torch.randn(3, B, H, S * (D + 1) + 1, device="cuda", generator=gen).to(dtype), S, D)
    return tuple(torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype) for _ in range(3))


def varlen_cu(lengths):
    """(n + 1,) int32 boundaries on the GPU of sequences of these lengths."""
    bounds = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    return bounds.to(device="cuda", dtype=torch.int32)


def make_varlen_qkv(lengths, D, dtype, layout="packed", seed=0):
    """q, k, v (T, H, D) of sequences of these lengths: the views of one (T, 3, H, D) projection
    ("packed"), contiguous tensors ("contiguous"), or views whose rows start off 16-byte boundaries
    ("odd", the (T, H, D) ones of `odd_varlen_views`)."""
    T = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "packed":
        return torch.randn(T, 3, H, D, device="cuda", generator=gen).to(dtype).unbind(1)
    if layout == "odd":
        return odd_varlen_views(torch.randn(3, T * H * (D + 1) + 1, device="cuda", generator=gen).to(dtype), T, D)
    return tuple(torch.randn(T, H, D, device="cuda", generator=gen).to(dtype) for _ in range(3))


def odd_varlen_views(base, T, D):
    """Three (T, H, D) views of base (3, T * H * (D + 1) + 1) at element offset 1, rows D + 1 apart:
    no row starts on a 16-byte boundary."""
    return tuple(t[1:].unfold(0, D, D + 1).view(T, H, D) for t in base.unbind(0))


def make_varlen_prefix(kind, lengths, dtype):
    """The (n,) prefix lengths of a PREFIXES case with S read as each sequence's own length ("random":
    per sequence in [0, len + 3)), or None."""
    if kind == "none":
        return None
    if kind == "random":
        return torch.tensor([int(torch.randint(0, n + 3, ())) for n in lengths], device="cuda", dtype=dtype)
    value = {"0": lambda n: 0, "1": lambda n: 1, "S-1": lambda n: max(n - 1, 0), "S": lambda n: n,
             "S+5": lambda n: n + 5}[kind]
    return torch.tensor([value(n) for n in lengths], device="cuda", dtype=dtype)


def nan_varlen_grads(T, D, dtype):
    """NaN-filled dq, dk, dv (T, H, D): the views of one packed (T, 3, H, D) buffer (what the
    qkvpacked op's backward passes)."""
    return torch.full((T, 3, H, D), float("nan"), device="cuda", dtype=dtype).unbind(1)


def odd_views(base, S, D):
    """Three (B, H, S, D) views of base (3, B, H, S * (D + 1) + 1) at element offset 1 with row stride
    D + 1: no row starts on a 16-byte boundary."""
    return tuple(t[..., 1:].unfold(-1, D, D + 1) for t in base.unbind(0))


def make_prefix(kind, S, dtype):
    """The (B,) prefix lengths of a PREFIXES case ("random": per sample in [0, S + 3)), or None."""
    if kind == "none":
        return None
    if kind == "random":
        return torch.randint(0, S + 3, (B,), device="cuda", dtype=dtype)
    value = {"0": 0, "1": 1, "S-1": max(S - 1, 0), "S": S, "S+5": S + 5}[kind]
    return torch.full((B,), value, device="cuda", dtype=dtype)


def nan_grads(q, k, v, packed=False):
    """NaN-filled gradient buffers: like q, k, v, or the [..., i, :] views of one (B, H, S, 3, D)
    buffer with the packed projection's layout (what the op's packed backward passes)."""
    if not packed:
        return tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    from aimv2_kernels.ops.attention import empty_packed_grads, packed_grad_strides

    strides = packed_grad_strides(q, k, v)
    assert strides is not None, "q, k, v are not the views of one packed projection"
    buf = empty_packed_grads(q, strides).fill_(float("nan"))
    return buf.unbind(3)


# ---- references and the tolerance rule -------------------------------------------------------------

def lowp_attention(q, k, v, prefix, causal, scale):
    """The same attention computed by PyTorch in q's dtype: the baseline of the tolerance rule."""
    S = q.shape[2]
    visible = ref.prefix_visibility(S, prefix, causal, device=q.device).unsqueeze(1)
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def fwd_bwd(fn, q, k, v, dout, prefix, causal, scale):
    """(out, dq, dk, dv) of fn by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, prefix, causal, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def reference64(q, k, v, dout, prefix, causal, scale):
    """float64 (out, dq, dk, dv) and lse from the reference."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    lse = ref.prefix_causal_attention_with_lse(q64, k64, v64, prefix, causal, scale)[1]
    return fwd_bwd(ref.prefix_causal_attention, q64, k64, v64, dout.double(), prefix, causal, scale), lse


def varlen_reference64(q, k, v, dout, cu, max_seqlen, prefix, causal, scale):
    """float64 (out, dq, dk, dv) (T, H, D) and lse (H, T) from the "torch" backend's varlen kernels."""
    from aimv2_kernels.torch_backend.attention_varlen import _attention_varlen_bwd_torch, _attention_varlen_fwd_torch

    q64, k64, v64 = (t.double() for t in (q, k, v))
    out, lse = _attention_varlen_fwd_torch(q64, k64, v64, cu, max_seqlen, prefix, causal, scale)
    grads = _attention_varlen_bwd_torch(dout.double(), q64, k64, v64, out, lse, cu, max_seqlen, prefix, causal, scale)
    return (out, *grads), lse


def varlen_lowp(q, k, v, dout, cu, prefix, causal, scale):
    """The baseline of the tolerance rule for packed sequences: (out, dq, dk, dv) (T, H, D) of
    `lowp_attention` run on each sequence alone, in q's dtype."""
    results = [torch.zeros_like(q) for _ in range(4)]
    bounds = cu.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v, dout)]  # (1, H, len, D)
        seq_prefix = None if prefix is None or not causal else prefix[s:s + 1]
        for result, part in zip(results, fwd_bwd(lowp_attention, *one[:3], one[3], seq_prefix, causal, scale)):
            result[start:end] = part[0].transpose(0, 1)
    return results


def check(name, got, want, baseline):
    """FlashAttention's rule on the relative error norm and on the worst element."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element never written?)"
    magnitude = max(float(want.abs().max()), 1e-30)
    rel, rel_base = rel_err(got, want), rel_err(baseline, want)
    assert rel <= 2 * rel_base + FLOOR, f"{name}: relative error {rel:.3e} > 2 x {rel_base:.3e} + {FLOOR}"
    worst, _ = max_abs_err(got, want)
    worst_base, _ = max_abs_err(baseline, want)
    bound = 2 * worst_base + FLOOR * magnitude
    assert worst <= bound, f"{name}: |error| {worst:.3e} > 2 x {worst_base:.3e} + {FLOOR} x {magnitude:.3e}"


def check_near_zero(name, got, want, unit):
    """S = 1: dq and dk vanish in exact arithmetic (one visible key: dP - delta = 0); the kernel's
    are differences of two roundings of one product, so they are bounded by that product's size."""
    assert float(want.abs().max()) <= 1e-10 * unit, f"{name}: the reference is not ~0"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert float(got.abs().max()) <= 1e-2 * unit, (
        f"{name}: expected ~0, got up to {float(got.abs().max()):.3e} (unit {unit:.3e})")


# ---- one path of the kernels -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionPath:
    """One path of the CUDA C++ attention: the ops `cuda_attention_fwd_<arch>` / `..._bwd_<arch>`."""

    arch: str                                    # "sm80" or "sm90"
    runs_on: Callable[[tuple[int, int]], bool]   # compute capability -> whether this path runs there
    needs: str                                   # the GPU it needs, in words, for the skip reason
    lse_bound: Callable[[float], float]          # max |lse64| -> the largest |lse - lse64| allowed

    @property
    def fwd_name(self) -> str:
        return f"cuda_attention_fwd_{self.arch}"

    @property
    def bwd_name(self) -> str:
        return f"cuda_attention_bwd_{self.arch}"

    def varlen_name(self, direction: str) -> str:
        """The varlen op of this path: direction "fwd" or "bwd"."""
        return f"cuda_attention_varlen_{direction}_{self.arch}"

    def skip_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
        capability = torch.cuda.get_device_capability()
        if not self.runs_on(capability):
            return f"needs {self.needs}, this GPU is {capability}"
        from aimv2_kernels.cuda_backend import ext as cuda_ext

        reason = cuda_ext.load_status()
        if reason is not None:
            return f"the CUDA extension does not load: {reason}"
        if not hasattr(torch.ops.aimv2_kernels, self.fwd_name):
            return f"this build of the extension has no {self.fwd_name}"
        return None

    def ops_or_skip(self, varlen=False):
        """torch.ops.aimv2_kernels, or a skip with the reason this path (its varlen ops) cannot run here."""
        reason = self.skip_reason()
        if reason is None and varlen and not hasattr(torch.ops.aimv2_kernels, self.varlen_name("fwd")):
            reason = f"this build of the extension has no {self.varlen_name('fwd')}"
        if reason is not None:
            pytest.skip(reason)
        return torch.ops.aimv2_kernels

    def run(self, ops, q, k, v, prefix, causal, scale, grads=None):
        """The compiled ops: (out, lse, dout, (dq, dk, dv)) with the gradients written into `grads`
        (NaN-filled buffers like q, k, v by default)."""
        out, lse = getattr(ops, self.fwd_name)(q, k, v, prefix, causal, scale)
        dout = torch.randn_like(out)
        grads = nan_grads(q, k, v) if grads is None else grads
        getattr(ops, self.bwd_name)(dout, q, k, v, out, lse, prefix, causal, scale, *grads)
        return out, lse, dout, grads

    def check(self, ops, q, k, v, prefix, causal, scale, tag, grads=None):
        """`run`, then `compare` (under `tag`); returns what `run` returned."""
        result = self.run(ops, q, k, v, prefix, causal, scale, grads)
        self.compare(q, k, v, prefix, causal, scale, *result, tag)
        return result

    def compare(self, q, k, v, prefix, causal, scale, out, lse, dout, grads, tag):
        """What `run` returned against the float64 reference: out's layout, out and the gradients by
        FlashAttention's rule (dq, dk ~0 at S = 1), lse within `lse_bound`."""
        S = q.shape[2]
        prefix_ref = prefix if causal else None
        want, lse64 = reference64(q, k, v, dout, prefix_ref, causal, scale)
        base = fwd_bwd(lowp_attention, q, k, v, dout, prefix_ref, causal, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert out.transpose(1, 2).is_contiguous(), "out must be a (B, H, S, D) view of (B, S, H, D) memory"
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        check(f"out {tag}", out, want[0], base[0])
        lse_err = float((lse.double() - lse64).abs().max())
        lse_bound = self.lse_bound(float(lse64.abs().max()))
        assert lse_err <= lse_bound, f"lse {tag}: |error| {lse_err:.3e} > {lse_bound:.3e}"
        unit = float(dout.abs().max() * v.abs().max() * k.abs().max()) * scale
        for name, g, w, b in zip(("dq", "dk", "dv"), grads, want[1:], base[1:]):
            if S == 1 and name != "dv":
                check_near_zero(f"{name} {tag}", g, w, unit)
            else:
                check(f"{name} {tag}", g, w, b)

    def run_varlen(self, ops, q, k, v, cu, max_seqlen, prefix, causal, scale, grads=None):
        """The compiled varlen ops: (out, lse, dout, (dq, dk, dv)) with the gradients written into
        `grads` (by default the NaN-filled views of one packed (T, 3, H, D) buffer)."""
        out, lse = getattr(ops, self.varlen_name("fwd"))(q, k, v, cu, max_seqlen, prefix, causal, scale)
        dout = torch.randn_like(out)
        grads = nan_varlen_grads(q.shape[0], q.shape[2], q.dtype) if grads is None else grads
        getattr(ops, self.varlen_name("bwd"))(dout, q, k, v, out, lse, cu, max_seqlen, prefix, causal, scale, *grads)
        return out, lse, dout, grads

    def check_varlen(self, ops, q, k, v, cu, prefix, causal, scale, tag, grads=None, max_seqlen=None):
        """`run_varlen` (max_seqlen: the longest sequence unless given), then `compare_varlen`;
        returns what `run_varlen` returned."""
        if max_seqlen is None:
            max_seqlen = int(cu.diff().max()) if cu.numel() > 1 else 0
        result = self.run_varlen(ops, q, k, v, cu, max_seqlen, prefix, causal, scale, grads)
        self.compare_varlen(q, k, v, cu, max_seqlen, prefix, causal, scale, *result, tag)
        return result

    def compare_varlen(self, q, k, v, cu, max_seqlen, prefix, causal, scale, out, lse, dout, grads, tag):
        """What `run_varlen` returned against the float64 reference: out (T, H, D) contiguous and
        the gradients by FlashAttention's rule, lse (H, T) within `lse_bound`."""
        prefix_ref = prefix if causal else None
        want, lse64 = varlen_reference64(q, k, v, dout, cu, max_seqlen, prefix_ref, causal, scale)
        base = varlen_lowp(q, k, v, dout, cu, prefix_ref, causal, scale)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
        check(f"out {tag}", out, want[0], base[0])
        lse_err = float((lse.double() - lse64).abs().max())
        lse_bound = self.lse_bound(float(lse64.abs().max()))
        assert lse_err <= lse_bound, f"lse {tag}: |error| {lse_err:.3e} > {lse_bound:.3e}"
        for name, g, w, b in zip(("dq", "dk", "dv"), grads, want[1:], base[1:]):
            check(f"{name} {tag}", g, w, b)
