"""The sm_80 attention kernels of csrc/attention_sm80.cu (mma.sync, cp.async, ldmatrix), called as the
compiled ops `cuda_attention_fwd_sm80` / `cuda_attention_bwd_sm80` directly, not through the backend
registry. They run on any GPU of compute capability 8.0 or newer (A100, and H100/H200 too).

Accuracy follows FlashAttention's rule: against the float64 reference (`reference.prefix_causal_
attention_with_lse`, gradients by autograd), the kernel's error -- relative error norm and worst
element -- is at most twice that of PyTorch computing the same attention in the low dtype, plus a
1e-3 floor. Cases: bf16 and fp16, head dims 64 and 128, B = 2, H = 3, S in {1, 7, 67, 130, 256, 1024}
(tiles that do not divide S, a single row), prefixes 0, 1, S - 1, S, S + 5, random per sample and
none, bidirectional (causal=False); q, k, v as the strided views of one packed (B, S, 3, H, D)
projection; gradients written into NaN-filled buffers, plain or the views of one packed buffer. Also:
int32 and int64 prefixes, a non-default scale, views whose rows are not 16-byte aligned, writes
confined to the given views, bitwise run-to-run determinism, S = 4096, and the argument errors.

Everything here skips unless a CUDA device of compute capability >= 8.0 is present and the extension
loads with these ops (on a machine without a GPU the whole module is collected and skipped).
"""
from __future__ import annotations

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

pytestmark = pytest.mark.gpu


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"needs compute capability 8.0 or newer, this GPU is {torch.cuda.get_device_capability()}"
    from aimv2_kernels import cuda_ext

    reason = cuda_ext.load_status()
    if reason is not None:
        return f"the CUDA extension does not load: {reason}"
    if not hasattr(torch.ops.aimv2_kernels, "cuda_attention_fwd_sm80"):
        return "this build of the extension has no cuda_attention_fwd_sm80"
    return None


@pytest.fixture(scope="module")
def ops():
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.aimv2_kernels


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Outputs start as NaN (AIMV2_KERNELS_POISON_OUTPUTS), so an element never written fails."""
    monkeypatch.setenv("AIMV2_KERNELS_POISON_OUTPUTS", "1")


# ---- inputs ----------------------------------------------------------------------------------------

def _qkv(S, D, dtype, layout="packed", seed=0):
    """q, k, v (B, H, S, D): the (B, H, S, D) views of one (B, S, 3, H, D) projection ("packed"),
    contiguous tensors ("contiguous"), or views whose rows start off 16-byte boundaries ("odd")."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "packed":
        qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=gen).to(dtype)
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))
    if layout == "odd":
        return _odd_views(torch.randn(3, B, H, S * (D + 1) + 1, device="cuda", generator=gen).to(dtype), S, D)
    return tuple(torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype) for _ in range(3))


def _odd_views(base, S, D):
    """Three (B, H, S, D) views of base (3, B, H, S * (D + 1) + 1) at element offset 1 with row stride
    D + 1: no row starts on a 16-byte boundary."""
    return tuple(t[..., 1:].unfold(-1, D, D + 1) for t in base.unbind(0))


def _prefix(kind, S, dtype=torch.int64):
    if kind == "none":
        return None
    if kind == "random":
        return torch.randint(0, S + 3, (B,), device="cuda", dtype=dtype)
    value = {"0": 0, "1": 1, "S-1": max(S - 1, 0), "S": S, "S+5": S + 5}[kind]
    return torch.full((B,), value, device="cuda", dtype=dtype)


def _nan_grads(q, k, v, packed=False):
    """NaN-filled gradient buffers: like q, k, v, or the [..., i, :] views of one (B, H, S, 3, D)
    buffer with the packed projection's layout (what the op's packed backward passes)."""
    if not packed:
        return tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    from aimv2_kernels.ops.attention import empty_packed_grads, packed_grad_strides

    strides = packed_grad_strides(q, k, v)
    assert strides is not None, "q, k, v are not the views of one packed projection"
    buf = empty_packed_grads(q, strides).fill_(float("nan"))
    return buf.unbind(3)


# ---- references ------------------------------------------------------------------------------------

def _lowp_attention(q, k, v, prefix, causal, scale):
    """The same attention computed by PyTorch in q's dtype: the baseline of the tolerance rule."""
    S = q.shape[2]
    visible = ref.prefix_visibility(S, prefix, causal, device=q.device).unsqueeze(1)
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def _fwd_bwd(fn, q, k, v, dout, prefix, causal, scale):
    """(out, dq, dk, dv) of fn by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, prefix, causal, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _reference64(q, k, v, dout, prefix, causal, scale):
    """float64 (out, dq, dk, dv) and lse from the reference."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    lse = ref.prefix_causal_attention_with_lse(q64, k64, v64, prefix, causal, scale)[1]
    return _fwd_bwd(ref.prefix_causal_attention, q64, k64, v64, dout.double(), prefix, causal, scale), lse


def _check(name, got, want, baseline):
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


def _check_tiny(name, got, want, unit):
    """S = 1: dq and dk vanish in exact arithmetic (one visible key: dP - delta = 0); the kernel's
    are differences of two roundings of one product, so they are bounded by that product's size."""
    assert float(want.abs().max()) <= 1e-10 * unit, f"{name}: the reference is not ~0"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert float(got.abs().max()) <= 1e-2 * unit, f"{name}: expected ~0, got up to {float(got.abs().max()):.3e}"


def _run(ops, q, k, v, prefix, causal, scale, grads=None):
    """The compiled ops: (out, lse, dout, (dq, dk, dv)) with the gradients written into `grads`
    (NaN-filled buffers like q, k, v by default)."""
    out, lse = ops.cuda_attention_fwd_sm80(q, k, v, prefix, causal, scale)
    dout = torch.randn_like(out)
    grads = _nan_grads(q, k, v) if grads is None else grads
    ops.cuda_attention_bwd_sm80(dout, q, k, v, out, lse, prefix, causal, scale, *grads)
    return out, lse, dout, grads


def _compare(q, k, v, prefix, causal, scale, out, lse, dout, grads, tag):
    S = q.shape[2]
    prefix_ref = prefix if causal else None
    want, lse64 = _reference64(q, k, v, dout, prefix_ref, causal, scale)
    base = _fwd_bwd(_lowp_attention, q, k, v, dout, prefix_ref, causal, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be a (B, H, S, D) view of (B, S, H, D) memory"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    _check(f"out {tag}", out, want[0], base[0])
    # lse: fp32 math on the exact inputs; its row sums are of the 16-bit P that multiplies V, so allow
    # a bf16-sized relative error of the sum (2^-8) on top of the floor.
    lse_err = float((lse.double() - lse64).abs().max())
    assert lse_err <= 4e-3 + FLOOR * float(lse64.abs().max()), f"lse {tag}: |error| {lse_err:.3e}"
    unit = float(dout.abs().max() * v.abs().max() * k.abs().max()) * scale
    for name, g, w, b in zip(("dq", "dk", "dv"), grads, want[1:], base[1:]):
        if S == 1 and name != "dv":
            _check_tiny(f"{name} {tag}", g, w, unit)
        else:
            _check(f"{name} {tag}", g, w, b)


# ---- accuracy --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix_kind", PREFIXES)
@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward(ops, dtype, D, S, prefix_kind):
    q, k, v = _qkv(S, D, dtype)
    prefix = _prefix(prefix_kind, S)
    scale = D**-0.5
    out, lse, dout, grads = _run(ops, q, k, v, prefix, True, scale)
    _compare(q, k, v, prefix, True, scale, out, lse, dout, grads, f"{dtype} D={D} S={S} prefix={prefix_kind}")


@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional(ops, dtype, D, S):
    """causal=False: every key visible; a prefix passed along is ignored."""
    q, k, v = _qkv(S, D, dtype)
    scale = D**-0.5
    out, lse, dout, grads = _run(ops, q, k, v, None, False, scale)
    _compare(q, k, v, None, False, scale, out, lse, dout, grads, f"{dtype} D={D} S={S} bidirectional")
    out2, lse2 = ops.cuda_attention_fwd_sm80(q, k, v, _prefix("1", S), False, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("layout", ("contiguous", "odd"))
def test_other_layouts(ops, D, layout):
    """Contiguous inputs, and views whose rows are off 16-byte boundaries (copied by the host entry);
    with those, gradient buffers off 16-byte boundaries too (computed aside and copied in)."""
    S, dtype = 130, torch.bfloat16
    q, k, v = _qkv(S, D, dtype, layout=layout)
    prefix = _prefix("random", S)
    scale = D**-0.5
    grads = None
    if layout == "odd":
        grads = _odd_views(torch.full((3, B, H, S * (D + 1) + 1), float("nan"), device="cuda", dtype=dtype), S, D)
    out, lse, dout, grads = _run(ops, q, k, v, prefix, True, scale, grads=grads)
    _compare(q, k, v, prefix, True, scale, out, lse, dout, grads, f"{layout} D={D}")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_packed_gradient_buffer(ops, D):
    """dq, dk, dv as the views of one (B, H, S, 3, D) buffer (the packed backward's layout)."""
    S, dtype = 256, torch.bfloat16
    q, k, v = _qkv(S, D, dtype)
    prefix = _prefix("random", S)
    scale = D**-0.5
    out, lse, dout, grads = _run(ops, q, k, v, prefix, True, scale, grads=_nan_grads(q, k, v, packed=True))
    _compare(q, k, v, prefix, True, scale, out, lse, dout, grads, f"packed grads D={D}")


@pytest.mark.parametrize("prefix_dtype", (torch.int32, torch.int64), ids=str)
def test_prefix_dtypes_and_scale(ops, prefix_dtype):
    S, D, dtype = 67, 64, torch.float16
    q, k, v = _qkv(S, D, dtype)
    prefix = torch.tensor([5, 60], device="cuda", dtype=prefix_dtype)
    out, lse, dout, grads = _run(ops, q, k, v, prefix, True, 0.3)
    _compare(q, k, v, prefix, True, 0.3, out, lse, dout, grads, f"prefix {prefix_dtype} scale 0.3")


def test_long_sequence(ops):
    S, D, dtype = 4096, 128, torch.bfloat16
    q, k, v = _qkv(S, D, dtype)
    prefix = torch.tensor([0, 1500], device="cuda")
    out, lse, dout, grads = _run(ops, q, k, v, prefix, True, D**-0.5)
    _compare(q, k, v, prefix, True, D**-0.5, out, lse, dout, grads, "S=4096")


# ---- memory behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("D", HEAD_DIMS)
def test_writes_stay_inside_the_views(ops, D):
    """Gradients into the [..., i, :] views (i < 3) of a (B, H, S, 4, D) buffer: slot 3 and rows past
    S (the buffer holds S + 9 rows) keep their sentinel; the inputs are not modified."""
    S, dtype = 67, torch.bfloat16
    q, k, v = _qkv(S, D, dtype)
    inputs = [t.clone() for t in (q, k, v)]
    buf = torch.full((B, H, S + 9, 4, D), 7.0, device="cuda", dtype=dtype)
    grads = tuple(buf[:, :, :S, i] for i in range(3))
    _run(ops, q, k, v, _prefix("random", S), True, D**-0.5, grads=grads)
    assert (buf[:, :, :, 3] == 7).all() and (buf[:, :, S:] == 7).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v)))


def test_deterministic(ops):
    """No atomics: two backward passes give bitwise identical gradients."""
    S, D, dtype = 256, 128, torch.bfloat16
    q, k, v = _qkv(S, D, dtype)
    prefix = _prefix("random", S)
    out, lse = ops.cuda_attention_fwd_sm80(q, k, v, prefix, True, D**-0.5)
    dout = torch.randn_like(out)
    results = []
    for _ in range(2):
        grads = _nan_grads(q, k, v)
        ops.cuda_attention_bwd_sm80(dout, q, k, v, out, lse, prefix, True, D**-0.5, *grads)
        results.append(grads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    out2, lse2 = ops.cuda_attention_fwd_sm80(q, k, v, prefix, True, D**-0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_empty_batch(ops):
    q = torch.randn(0, H, 8, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = ops.cuda_attention_fwd_sm80(q, q, q, None, True, 0.125)
    assert out.shape == q.shape and lse.shape == (0, H, 8)
    ops.cuda_attention_bwd_sm80(q, q, q, q, out, lse, None, True, 0.125, q.clone(), q.clone(), q.clone())


# ---- argument errors -------------------------------------------------------------------------------

# (expected words of the message, arguments); CPU tensors are refused by the dispatcher before the op.
def _bad_fwd_args(q, case):
    strided_last = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last stride 8, not 1
    zeros = torch.zeros(B + 1, device="cuda", dtype=torch.int64)
    return {
        "dtype": ("must be float16 or bfloat16", (q.float(), q.float(), q.float(), None, True, 0.125)),
        "head dim": ("must be 64 or 128", (q[..., :48], q[..., :48], q[..., :48], None, True, 0.125)),
        "shape": ("k must have shape", (q, q[:, :, :4], q, None, True, 0.125)),
        "mixed dtypes": ("v must have q's dtype", (q, q, q.half(), None, True, 0.125)),
        "last stride": ("contiguous last dim", (strided_last, q, q, None, True, 0.125)),
        "prefix shape": ("prefix_len must have shape", (q, q, q, zeros, True, 0.125)),
        "prefix dtype": ("prefix_len must be int32 or int64", (q, q, q, zeros[:B].float(), True, 0.125)),
        "scale": ("scale must be a positive", (q, q, q, None, True, -1.0)),
    }[case]


@pytest.mark.parametrize("case", ("dtype", "head dim", "shape", "mixed dtypes", "last stride", "prefix shape",
                                  "prefix dtype", "scale"))
def test_forward_argument_errors_name_the_op(ops, case):
    q = torch.randn(B, H, 8, 64, device="cuda", dtype=torch.bfloat16)
    message, args = _bad_fwd_args(q, case)
    with pytest.raises(RuntimeError, match="attention_fwd_sm80") as info:
        ops.cuda_attention_fwd_sm80(*args)
    assert message in str(info.value)


def test_backward_argument_errors_name_the_op(ops):
    q = torch.randn(B, H, 8, 64, device="cuda", dtype=torch.bfloat16)
    out, lse = ops.cuda_attention_fwd_sm80(q, q, q, None, True, 0.125)
    grads = _nan_grads(q, q, q)
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: lse must be float32"):
        ops.cuda_attention_bwd_sm80(out, q, q, q, out, lse.double(), None, True, 0.125, *grads)
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: dk must have shape"):
        ops.cuda_attention_bwd_sm80(out, q, q, q, out, lse, None, True, 0.125, grads[0], grads[1][:, :1], grads[2])
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: dout must have q's dtype"):
        ops.cuda_attention_bwd_sm80(out.half(), q, q, q, out, lse, None, True, 0.125, *grads)
