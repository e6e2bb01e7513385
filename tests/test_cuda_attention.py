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
from cuda_attention_cases import (B, FLOOR, HEAD_DIMS, H, AttentionPath, accuracy_grid, make_prefix, make_qkv,
                                  nan_grads, odd_views)

# lse: fp32 math on the exact inputs; its row sums are of the 16-bit P that multiplies V, so allow a
# bf16-sized relative error of the sum (2^-8) on top of the floor.
SM80 = AttentionPath("sm80", runs_on=lambda capability: capability >= (8, 0), needs="compute capability 8.0 or newer",
                     lse_bound=lambda lse_max: 4e-3 + FLOOR * lse_max)
PREFIX_DTYPE = torch.int64  # of the prefix cases, unless a test says otherwise

# every output starts as NaN (tests/conftest.py), so an element never written fails
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_cuda_outputs")]


@pytest.fixture(scope="module")
def ops():
    return SM80.ops_or_skip()


# ---- accuracy --------------------------------------------------------------------------------------

@accuracy_grid(prefixes=True)
def test_forward_and_backward(ops, dtype, D, S, prefix_kind):
    q, k, v = make_qkv(S, D, dtype)
    prefix = make_prefix(prefix_kind, S, PREFIX_DTYPE)
    scale = D**-0.5
    SM80.check(ops, q, k, v, prefix, True, scale, f"{dtype} D={D} S={S} prefix={prefix_kind}")


@accuracy_grid(prefixes=False)
def test_bidirectional(ops, dtype, D, S):
    """causal=False: every key visible; a prefix passed along is ignored."""
    q, k, v = make_qkv(S, D, dtype)
    scale = D**-0.5
    out, lse, _, _ = SM80.check(ops, q, k, v, None, False, scale, f"{dtype} D={D} S={S} bidirectional")
    out2, lse2 = ops.cuda_attention_fwd_sm80(q, k, v, make_prefix("1", S, PREFIX_DTYPE), False, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("layout", ("contiguous", "odd"))
def test_other_layouts(ops, D, layout):
    """Contiguous inputs, and views whose rows are off 16-byte boundaries (copied by the host entry);
    with those, gradient buffers off 16-byte boundaries too (computed aside and copied in)."""
    S, dtype = 130, torch.bfloat16
    q, k, v = make_qkv(S, D, dtype, layout=layout)
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    scale = D**-0.5
    grads = None
    if layout == "odd":
        grads = odd_views(torch.full((3, B, H, S * (D + 1) + 1), float("nan"), device="cuda", dtype=dtype), S, D)
    SM80.check(ops, q, k, v, prefix, True, scale, f"{layout} D={D}", grads=grads)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_packed_gradient_buffer(ops, D):
    """dq, dk, dv as the views of one (B, H, S, 3, D) buffer (the packed backward's layout)."""
    S, dtype = 256, torch.bfloat16
    q, k, v = make_qkv(S, D, dtype)
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    scale = D**-0.5
    SM80.check(ops, q, k, v, prefix, True, scale, f"packed grads D={D}", grads=nan_grads(q, k, v, packed=True))


@pytest.mark.parametrize("prefix_dtype", (torch.int32, torch.int64), ids=str)
def test_prefix_dtypes_and_scale(ops, prefix_dtype):
    S, D, dtype = 67, 64, torch.float16
    q, k, v = make_qkv(S, D, dtype)
    prefix = torch.tensor([5, 60], device="cuda", dtype=prefix_dtype)
    SM80.check(ops, q, k, v, prefix, True, 0.3, f"prefix {prefix_dtype} scale 0.3")


def test_long_sequence(ops):
    S, D, dtype = 4096, 128, torch.bfloat16
    q, k, v = make_qkv(S, D, dtype)
    prefix = torch.tensor([0, 1500], device="cuda")
    SM80.check(ops, q, k, v, prefix, True, D**-0.5, "S=4096")


# ---- memory behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("D", HEAD_DIMS)
def test_writes_stay_inside_the_views(ops, D):
    """Gradients into the [..., i, :] views (i < 3) of a (B, H, S, 4, D) buffer: slot 3 and rows past
    S (the buffer holds S + 9 rows) keep their sentinel; the inputs are not modified."""
    S, dtype = 67, torch.bfloat16
    q, k, v = make_qkv(S, D, dtype)
    inputs = [t.clone() for t in (q, k, v)]
    buf = torch.full((B, H, S + 9, 4, D), 7.0, device="cuda", dtype=dtype)
    grads = tuple(buf[:, :, :S, i] for i in range(3))
    SM80.run(ops, q, k, v, make_prefix("random", S, PREFIX_DTYPE), True, D**-0.5, grads=grads)
    assert (buf[:, :, :, 3] == 7).all() and (buf[:, :, S:] == 7).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v)))


def test_deterministic(ops):
    """No atomics: two backward passes give bitwise identical gradients."""
    S, D, dtype = 256, 128, torch.bfloat16
    q, k, v = make_qkv(S, D, dtype)
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    out, lse = ops.cuda_attention_fwd_sm80(q, k, v, prefix, True, D**-0.5)
    dout = torch.randn_like(out)
    results = []
    for _ in range(2):
        grads = nan_grads(q, k, v)
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
    grads = nan_grads(q, q, q)
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: lse must be float32"):
        ops.cuda_attention_bwd_sm80(out, q, q, q, out, lse.double(), None, True, 0.125, *grads)
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: dk must have shape"):
        ops.cuda_attention_bwd_sm80(out, q, q, q, out, lse, None, True, 0.125, grads[0], grads[1][:, :1], grads[2])
    with pytest.raises(RuntimeError, match="attention_bwd_sm80: dout must have q's dtype"):
        ops.cuda_attention_bwd_sm80(out.half(), q, q, q, out, lse, None, True, 0.125, *grads)
