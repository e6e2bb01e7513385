"""The Hopper (sm_90a) attention kernels of csrc/attention_sm90.cu, called as the compiled ops
`cuda_attention_fwd_sm90` / `cuda_attention_bwd_sm90` directly (not through the backend registry).

Against the float64 reference with FlashAttention's rule: the kernel's error (relative error norm and
worst element) is at most twice that of PyTorch computing the same attention in the low dtype, plus a
1e-3 floor. bf16 and fp16, head dims 64 and 128, B = 2, H = 3, S from 1 to 1024 (and one 4096 case),
prefixes 0, 1, S - 1, S, S + 5, per-sample random and none, bidirectional, q/k/v as the strided views
of one packed (B, S, 3, H, D) projection, gradients written into NaN-filled (possibly packed) buffers.

Everything skips unless a CUDA device of compute capability 9.0 is present and the extension loads;
on such a machine a build without sm_90a device code fails `test_build_has_sm90a_device_code`.
"""
from __future__ import annotations

import pytest
import torch

from aimv2_kernels import reference as ref
from tests.helpers import max_abs_err, rel_err

B, H = 2, 3
DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
SEQ_LENS = (1, 7, 67, 130, 256, 1024)
PREFIXES = ("0", "1", "S-1", "S", "S+5", "random", "none")
FLOOR = 1e-3

pytestmark = pytest.mark.gpu


def _hopper_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU, this one is {torch.cuda.get_device_capability()}"
    from aimv2_kernels import cuda_ext

    reason = cuda_ext.load_status()
    if reason is not None:
        return f"the CUDA extension does not load: {reason}"
    if not hasattr(torch.ops.aimv2_kernels, "cuda_attention_fwd_sm90"):
        return "this build of the extension has no cuda_attention_fwd_sm90"
    return None


@pytest.fixture(scope="module")
def ops():
    reason = _hopper_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return torch.ops.aimv2_kernels


@pytest.fixture(scope="module")
def sm90(ops):
    """The ops, once the build is known to carry sm_90a code (else the tests below skip and
    test_build_has_sm90a_device_code fails with the reason)."""
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    try:
        ops.cuda_attention_fwd_sm90(q, q, q, None, True, 0.125)
    except RuntimeError as exc:
        if "sm_90a" in str(exc):
            pytest.skip(str(exc))
        raise
    return ops


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    """Buffers the launchers allocate start as NaN bytes (AIMV2_KERNELS_POISON_OUTPUTS)."""
    monkeypatch.setenv("AIMV2_KERNELS_POISON_OUTPUTS", "1")


# ---- inputs ----------------------------------------------------------------------------------------

def _qkv(S, D, dtype, layout="packed", seed=0):
    """q, k, v (B, H, S, D): the strided views of one (B, S, 3, H, D) projection, or contiguous."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "packed":
        qkv = torch.randn(B, S, 3, H, D, device="cuda", generator=gen).to(dtype)
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))
    return tuple(torch.randn(B, H, S, D, device="cuda", generator=gen).to(dtype) for _ in range(3))


def _prefix(kind, S, dtype=torch.int32):
    if kind == "none":
        return None
    if kind == "random":
        return torch.randint(0, S + 3, (B,), device="cuda", dtype=dtype)
    value = {"0": 0, "1": 1, "S-1": max(S - 1, 0), "S": S, "S+5": S + 5}[kind]
    return torch.full((B,), value, device="cuda", dtype=dtype)


# ---- references ------------------------------------------------------------------------------------

def _torch_attention(q, k, v, prefix, causal, scale):
    """The same attention in q's dtype (PyTorch's own rounding: the baseline of the tolerance rule)."""
    S = q.shape[2]
    visible = ref.prefix_visibility(S, prefix, causal, device=q.device).unsqueeze(1)
    scores = (q @ k.transpose(-2, -1)) * scale
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def _fwd_bwd(fn, q, k, v, dout, prefix, causal, scale):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, prefix, causal, scale)
    return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _reference64(q, k, v, dout, prefix, causal, scale):
    """float64 (out, dq, dk, dv) and lse."""
    def fn(q, k, v, prefix, causal, scale):
        return ref.prefix_causal_attention(q, k, v, prefix, causal, scale)

    q64, k64, v64 = (t.double() for t in (q, k, v))
    lse = ref.prefix_causal_attention_with_lse(q64, k64, v64, prefix, causal, scale)[1]
    return _fwd_bwd(fn, q64, k64, v64, dout.double(), prefix, causal, scale), lse


def _check(name, got, want, baseline):
    """FlashAttention's rule on the relative error norm and on the worst element."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element never written?)"
    scale = max(float(want.abs().max()), 1e-30)
    rel, rel_base = rel_err(got, want), rel_err(baseline, want)
    assert rel <= 2 * rel_base + FLOOR, f"{name}: relative error {rel:.3e} > 2 x {rel_base:.3e} + {FLOOR}"
    worst, _ = max_abs_err(got, want)
    worst_base, _ = max_abs_err(baseline, want)
    bound = 2 * worst_base + FLOOR * scale
    assert worst <= bound, f"{name}: |error| {worst:.3e} > 2 x {worst_base:.3e} + {FLOOR} x {scale:.3e}"


def _check_near_zero(name, got, want, unit):
    """S = 1: dq and dk are zero in exact arithmetic (a single visible key: dP - delta = 0); computed,
    they are a difference of two roundings of the same product, so bound them by that product's size."""
    assert float(want.abs().max()) <= 1e-10 * unit, f"{name}: the reference is not ~0"
    assert torch.isfinite(got).all() and float(got.abs().max()) <= 1e-2 * unit, (
        f"{name}: expected ~0, got up to {float(got.abs().max()):.3e} (unit {unit:.3e})")


def _run(ops, q, k, v, prefix, causal, scale, grads=None, backward=True):
    """The compiled ops: (out, lse) and, with backward, (dq, dk, dv) written into `grads` (NaN-filled
    buffers like q, k, v by default)."""
    out, lse = ops.cuda_attention_fwd_sm90(q, k, v, prefix, causal, scale)
    if not backward:
        return out, lse, None, None
    dout = torch.randn_like(out)
    if grads is None:
        grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    ops.cuda_attention_bwd_sm90(dout, q, k, v, out, lse, prefix, causal, scale, *grads)
    return out, lse, dout, grads


def _compare(q, k, v, prefix, causal, scale, out, lse, dout, grads, tag):
    S = q.shape[2]
    prefix_ref = prefix if causal else None
    (want, lse64) = _reference64(q, k, v, dout if dout is not None else torch.zeros_like(out), prefix_ref, causal,
                                 scale)
    base = _fwd_bwd(_torch_attention, q, k, v, dout if dout is not None else torch.zeros_like(out), prefix_ref,
                    causal, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous(), "out must be a (B, H, S, D) view of (B, S, H, D) memory"
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    _check(f"out {tag}", out, want[0], base[0])
    lse_err = float((lse.double() - lse64).abs().max())
    assert lse_err <= FLOOR * max(1.0, float(lse64.abs().max())), f"lse {tag}: |error| {lse_err:.3e}"
    if dout is None:
        return
    unit = float(dout.abs().max() * v.abs().max() * k.abs().max()) * scale
    for name, g, w, b in zip(("dq", "dk", "dv"), grads, want[1:], base[1:]):
        if S == 1 and name != "dv":
            _check_near_zero(f"{name} {tag}", g, w, unit)
        else:
            _check(f"{name} {tag}", g, w, b)


# ---- tests -----------------------------------------------------------------------------------------

def test_build_has_sm90a_device_code(ops):
    """On an H100/H200 with the extension loaded, the sm_90 ops must run (a build for "9.0" without
    the "a" compiles the Hopper kernels empty and the ops refuse with this message)."""
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    ops.cuda_attention_fwd_sm90(q, q, q, None, True, 0.125)


@pytest.mark.parametrize("prefix_kind", PREFIXES)
@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward(sm90, dtype, D, S, prefix_kind):
    q, k, v = _qkv(S, D, dtype)
    prefix = _prefix(prefix_kind, S)
    scale = D**-0.5
    out, lse, dout, grads = _run(sm90, q, k, v, prefix, True, scale)
    _compare(q, k, v, prefix, True, scale, out, lse, dout, grads, f"{dtype} D={D} S={S} prefix={prefix_kind}")


@pytest.mark.parametrize("S", SEQ_LENS)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional(sm90, dtype, D, S):
    """causal=False: every key visible; a prefix, if passed, changes nothing."""
    q, k, v = _qkv(S, D, dtype, seed=1)
    out, lse, dout, grads = _run(sm90, q, k, v, _prefix("1", S), False, D**-0.5)
    _compare(q, k, v, None, False, D**-0.5, out, lse, dout, grads, f"bidirectional {dtype} D={D} S={S}")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_contiguous_inputs_int64_prefix_and_other_scale(sm90, D):
    S = 200
    q, k, v = _qkv(S, D, torch.bfloat16, layout="contiguous", seed=2)
    prefix = _prefix("random", S, dtype=torch.int64)
    out, lse, dout, grads = _run(sm90, q, k, v, prefix, True, 0.3)
    _compare(q, k, v, prefix, True, 0.3, out, lse, dout, grads, f"contiguous D={D}")


def test_strided_prefix_tensor(sm90):
    S = 150
    q, k, v = _qkv(S, 64, torch.bfloat16, seed=3)
    wide = torch.tensor([[37, -1], [140, -1]], device="cuda", dtype=torch.int32)
    prefix = wide[:, 0]  # stride 2
    out, lse, dout, grads = _run(sm90, q, k, v, prefix, True, 0.125)
    _compare(q, k, v, prefix.contiguous(), True, 0.125, out, lse, dout, grads, "strided prefix")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gradients_into_one_packed_buffer(sm90, D):
    """dq, dk, dv as the views of one (B, H, S, 3, D) buffer (what the autograd op passes for packed
    projections), NaN-filled: every element must be written, none of another gradient's."""
    S = 130
    q, k, v = _qkv(S, D, torch.bfloat16, seed=4)
    packed = torch.full((B, S, 3, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    grads = tuple(t.transpose(1, 2) for t in packed.unbind(2))
    prefix = _prefix("random", S)
    out, lse, dout, grads = _run(sm90, q, k, v, prefix, True, D**-0.5, grads=grads)
    assert torch.isfinite(packed).all()
    _compare(q, k, v, prefix, True, D**-0.5, out, lse, dout, grads, f"packed grads D={D}")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_long_sequence(sm90, D):
    S = 4096
    q, k, v = _qkv(S, D, torch.bfloat16, seed=5)
    prefix = _prefix("random", S)
    out, lse, dout, grads = _run(sm90, q, k, v, prefix, True, D**-0.5)
    _compare(q, k, v, prefix, True, D**-0.5, out, lse, dout, grads, f"S=4096 D={D}")


def test_backward_is_deterministic(sm90):
    S = 300
    q, k, v = _qkv(S, 128, torch.bfloat16, seed=6)
    prefix = _prefix("random", S)
    out, lse = sm90.cuda_attention_fwd_sm90(q, k, v, prefix, True, 0.09)
    dout = torch.randn_like(out)
    results = []
    for _ in range(3):
        grads = tuple(torch.empty_like(t) for t in (q, k, v))
        sm90.cuda_attention_bwd_sm90(dout, q, k, v, out, lse, prefix, True, 0.09, *grads)
        results.append(grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_last_key_changes_only_the_last_row(sm90):
    """Plain causal: the last key is visible only to the last query, and the tiles of the other rows
    never load it: their output is bit-identical when it changes."""
    S = 257
    q, k, v = _qkv(S, 64, torch.bfloat16, seed=7)
    out1, _ = sm90.cuda_attention_fwd_sm90(q, k, v, None, True, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] -= 2.0
    out2, _ = sm90.cuda_attention_fwd_sm90(q, k2, v2, None, True, 0.125)
    assert torch.equal(out1[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out1[:, :, -1], out2[:, :, -1])


def test_bad_inputs_are_clear_errors(sm90):
    q, k, v = _qkv(16, 64, torch.bfloat16, layout="contiguous")
    fwd = sm90.cuda_attention_fwd_sm90
    with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
        fwd(q[..., :32], k[..., :32], v[..., :32], None, True, 0.1)
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        fwd(q.float(), k.float(), v.float(), None, True, 0.1)
    with pytest.raises(RuntimeError, match="k must have shape"):
        fwd(q, k[:, :, :8], v, None, True, 0.1)
    with pytest.raises(RuntimeError, match="prefix_len must be int32 or int64"):
        fwd(q, k, v, torch.zeros(B, device="cuda"), True, 0.1)
    # a row stride of 65 elements is not a multiple of 16 bytes: TMA cannot take it
    wide = torch.randn(B, H, 16, 65, device="cuda", dtype=torch.bfloat16)[..., :64]
    with pytest.raises(RuntimeError, match="multiples of 16 bytes"):
        fwd(wide, k, v, None, True, 0.1)
    out, lse = fwd(q, k, v, None, True, 0.1)
    dout = torch.randn_like(out)
    bad_dq = torch.empty(B, H, 16, 72, device="cuda", dtype=torch.bfloat16)[..., 1:65]
    with pytest.raises(RuntimeError, match="dq must have rows on 16-byte boundaries"):
        sm90.cuda_attention_bwd_sm90(dout, q, k, v, out, lse, None, True, 0.1, bad_dq, torch.empty_like(k),
                                     torch.empty_like(v))
