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

The varlen ops (`cuda_attention_varlen_fwd_sm80` / `..._bwd_sm80`, packed (T, H, D) sequences) on
sequences of lengths 67, 1, 0, 300, 7, 130 packed back to back, against the "torch" backend's varlen
kernels in float64 by the same rule: every prefix kind (per sequence, S read as its length),
bidirectional, bf16 and fp16, D 64 and 128, q, k, v and the gradients as the views of packed
(T, 3, H, D) buffers; each sequence bitwise equal to the padded kernels run on it alone (the same
code: a key of the next sequence can never be visible), a larger max_seqlen, odd layouts, empty
sequences and batches, determinism, opcheck and the argument errors.

Everything here skips unless a CUDA device of compute capability >= 8.0 is present and the extension
loads with these ops (on a machine without a GPU the whole module is collected and skipped).
"""
from __future__ import annotations

import pytest
import torch
from cuda_attention_cases import (B, DTYPES, FLOOR, HEAD_DIMS, PREFIXES, H, AttentionPath, accuracy_grid,
                                  make_prefix, make_qkv, make_varlen_prefix, make_varlen_qkv, nan_grads,
                                  nan_varlen_grads, odd_varlen_views, odd_views, varlen_cu)

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


@pytest.fixture(scope="module")
def varlen_ops():
    return SM80.ops_or_skip(varlen=True)


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


# ---- packed variable-length sequences --------------------------------------------------------------

# Odd lengths: one row, below one tile, across tiles (64-row dK/dV and dQ tiles, 128-row forward
# tiles), an empty sequence among them.
VARLEN_LENGTHS = (67, 1, 0, 300, 7, 130)


@pytest.mark.parametrize("prefix_kind", PREFIXES)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_forward_and_backward(varlen_ops, dtype, D, prefix_kind):
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    prefix = make_varlen_prefix(prefix_kind, VARLEN_LENGTHS, PREFIX_DTYPE)
    SM80.check_varlen(varlen_ops, q, k, v, varlen_cu(VARLEN_LENGTHS), prefix, True, D**-0.5,
                      f"varlen {dtype} D={D} prefix={prefix_kind}")


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_bidirectional(varlen_ops, dtype, D):
    """causal=False: every key of the same sequence visible; a prefix passed along is ignored."""
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    cu, scale = varlen_cu(VARLEN_LENGTHS), D**-0.5
    out, lse, _, _ = SM80.check_varlen(varlen_ops, q, k, v, cu, None, False, scale,
                                       f"varlen {dtype} D={D} bidirectional")
    prefix = make_varlen_prefix("1", VARLEN_LENGTHS, PREFIX_DTYPE)
    out2, lse2 = varlen_ops.cuda_attention_varlen_fwd_sm80(q, k, v, cu, max(VARLEN_LENGTHS), prefix, False, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


@pytest.mark.parametrize("prefix_dtype", (torch.int32, torch.int64), ids=str)
def test_varlen_prefix_dtypes_and_scale(varlen_ops, prefix_dtype):
    lengths, D = (5, 70, 0, 33), 64
    q, k, v = make_varlen_qkv(lengths, D, torch.float16)
    prefix = torch.tensor([2, 60, 4, 40], device="cuda", dtype=prefix_dtype)
    SM80.check_varlen(varlen_ops, q, k, v, varlen_cu(lengths), prefix, True, 0.3,
                      f"varlen prefix {prefix_dtype} scale 0.3")


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("layout", ("contiguous", "odd"))
def test_varlen_other_layouts(varlen_ops, D, layout):
    """Contiguous q, k, v with contiguous gradient buffers, and views whose rows are off 16-byte
    boundaries (copied by the host entry) with gradient buffers off them too (computed aside and
    copied in)."""
    dtype = torch.bfloat16
    T = sum(VARLEN_LENGTHS)
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype, layout=layout)
    if layout == "odd":
        grads = odd_varlen_views(torch.full((3, T * H * (D + 1) + 1), float("nan"), device="cuda", dtype=dtype), T, D)
    else:
        grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    prefix = make_varlen_prefix("random", VARLEN_LENGTHS, PREFIX_DTYPE)
    SM80.check_varlen(varlen_ops, q, k, v, varlen_cu(VARLEN_LENGTHS), prefix, True, D**-0.5, f"varlen {layout} D={D}",
                      grads=grads)


@pytest.mark.parametrize("causal", (True, False))
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_varlen_equals_the_padded_kernels_per_sequence(varlen_ops, D, causal):
    """Each sequence's out, lse and gradients are bitwise those of the padded kernels run on that
    sequence alone (the same code with the sequence's S): whatever follows a sequence in the packed
    batch, the next sequence's keys included, never reaches it."""
    dtype, scale = torch.bfloat16, D**-0.5
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    cu = varlen_cu(VARLEN_LENGTHS)
    prefix = make_varlen_prefix("random", VARLEN_LENGTHS, PREFIX_DTYPE)
    out, lse, dout, grads = SM80.run_varlen(varlen_ops, q, k, v, cu, max(VARLEN_LENGTHS), prefix, causal, scale)
    bounds = cu.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        one = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v, dout)]  # (1, H, len, D)
        seq_prefix = prefix[s:s + 1]
        out1, lse1 = varlen_ops.cuda_attention_fwd_sm80(*one[:3], seq_prefix, causal, scale)
        grads1 = nan_grads(*one[:3])
        varlen_ops.cuda_attention_bwd_sm80(one[3], *one[:3], out1, lse1, seq_prefix, causal, scale, *grads1)
        tag = f"sequence {s} (rows {start}:{end})"
        assert torch.equal(out[start:end], out1[0].transpose(0, 1)), f"out of {tag}"
        assert torch.equal(lse[:, start:end], lse1[0]), f"lse of {tag}"
        for name, g, g1 in zip(("dq", "dk", "dv"), grads, grads1):
            assert torch.equal(g[start:end], g1[0].transpose(0, 1)), f"{name} of {tag}"


def test_varlen_larger_max_seqlen_changes_nothing(varlen_ops):
    """max_seqlen only sizes the grid: the extra blocks leave at once, the results are the same bits."""
    D, dtype = 128, torch.bfloat16
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    cu = varlen_cu(VARLEN_LENGTHS)
    prefix = make_varlen_prefix("random", VARLEN_LENGTHS, PREFIX_DTYPE)
    results = []
    for max_seqlen in (max(VARLEN_LENGTHS), 1000):
        torch.manual_seed(0)  # the same dout
        out, lse, _, grads = SM80.run_varlen(varlen_ops, q, k, v, cu, max_seqlen, prefix, True, D**-0.5)
        results.append((out, lse, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_varlen_writes_stay_inside_the_views(varlen_ops, D):
    """Gradients into the [:, i] views (i < 3) of a (T + 9, 4, H, D) buffer: slot 3 and the rows past
    T keep their sentinel; the inputs are not modified."""
    dtype = torch.bfloat16
    T = sum(VARLEN_LENGTHS)
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    inputs = [t.clone() for t in (q, k, v)]
    buf = torch.full((T + 9, 4, H, D), 7.0, device="cuda", dtype=dtype)
    grads = tuple(buf[:T, i] for i in range(3))
    prefix = make_varlen_prefix("random", VARLEN_LENGTHS, PREFIX_DTYPE)
    SM80.run_varlen(varlen_ops, q, k, v, varlen_cu(VARLEN_LENGTHS), max(VARLEN_LENGTHS), prefix, True, D**-0.5,
                    grads=grads)
    assert (buf[:, 3] == 7).all() and (buf[T:] == 7).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v)))


def test_varlen_deterministic(varlen_ops):
    D, dtype = 128, torch.bfloat16
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, dtype)
    cu, max_seqlen = varlen_cu(VARLEN_LENGTHS), max(VARLEN_LENGTHS)
    prefix = make_varlen_prefix("random", VARLEN_LENGTHS, PREFIX_DTYPE)
    out, lse = varlen_ops.cuda_attention_varlen_fwd_sm80(q, k, v, cu, max_seqlen, prefix, True, D**-0.5)
    dout = torch.randn_like(out)
    results = []
    for _ in range(2):
        grads = nan_varlen_grads(q.shape[0], D, dtype)
        varlen_ops.cuda_attention_varlen_bwd_sm80(dout, q, k, v, out, lse, cu, max_seqlen, prefix, True, D**-0.5,
                                                  *grads)
        results.append(grads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    out2, lse2 = varlen_ops.cuda_attention_varlen_fwd_sm80(q, k, v, cu, max_seqlen, prefix, True, D**-0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_varlen_opcheck(varlen_ops):
    """Schemas (the backward writes dq, dk, dv and nothing else), fake kernels and dispatch of both ops."""
    import aimv2_kernels as ak

    assert ak.unavailable_reason("cuda") is None  # loading the backend registers the fake kernels
    lengths = (5, 0, 40)
    q, k, v = make_varlen_qkv(lengths, 64, torch.bfloat16)
    cu, prefix = varlen_cu(lengths), torch.tensor([2, 0, 7], device="cuda")
    fwd_args = (q, k, v, cu, 40, prefix, True, 0.125)
    torch.library.opcheck(varlen_ops.cuda_attention_varlen_fwd_sm80, fwd_args)
    out, lse = varlen_ops.cuda_attention_varlen_fwd_sm80(*fwd_args)
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    torch.library.opcheck(varlen_ops.cuda_attention_varlen_bwd_sm80,
                          (torch.randn_like(out), q, k, v, out, lse, cu, 40, prefix, True, 0.125, *grads))


@pytest.mark.parametrize("lengths", [(0, 0, 0), ()], ids=["empty sequences", "no sequence"])
def test_varlen_nothing_to_compute(varlen_ops, lengths):
    q = torch.randn(0, H, 64, device="cuda", dtype=torch.bfloat16)
    cu = varlen_cu(lengths)
    out, lse = varlen_ops.cuda_attention_varlen_fwd_sm80(q, q, q, cu, 0, None, True, 0.125)
    assert out.shape == (0, H, 64) and lse.shape == (H, 0)
    varlen_ops.cuda_attention_varlen_bwd_sm80(q, q, q, q, out, lse, cu, 0, None, True, 0.125, q.clone(), q.clone(),
                                              q.clone())


def _bad_varlen_fwd_args(q, case):
    cu = varlen_cu((3, 5))
    return {
        "layout": ("q must be (T, H, D)", (q.unsqueeze(0), q.unsqueeze(0), q.unsqueeze(0), cu, 5, None, True, 0.125)),
        "dtype": ("must be float16 or bfloat16", (q.float(), q.float(), q.float(), cu, 5, None, True, 0.125)),
        "head dim": ("must be 64 or 128", (q[..., :48], q[..., :48], q[..., :48], cu, 5, None, True, 0.125)),
        "shape": ("k must have shape", (q, q[:4], q, cu, 5, None, True, 0.125)),
        "cu_seqlens dtype": ("cu_seqlens must be int32", (q, q, q, cu.long(), 5, None, True, 0.125)),
        "cu_seqlens shape": ("cu_seqlens must have shape (N + 1,)", (q, q, q, cu.view(1, 3), 5, None, True, 0.125)),
        "cu_seqlens device": ("cu_seqlens must be a CUDA tensor", (q, q, q, cu.cpu(), 5, None, True, 0.125)),
        "max_seqlen": ("max_seqlen must be in", (q, q, q, cu, -1, None, True, 0.125)),
        "prefix shape": ("prefix_len must have shape (N,) = (2,)",
                         (q, q, q, cu, 5, torch.zeros(3, device="cuda", dtype=torch.int64), True, 0.125)),
        "prefix dtype": ("prefix_len must be int32 or int64",
                         (q, q, q, cu, 5, torch.zeros(2, device="cuda"), True, 0.125)),
        "scale": ("scale must be a positive", (q, q, q, cu, 5, None, True, -1.0)),
    }[case]


@pytest.mark.parametrize("case", ("layout", "dtype", "head dim", "shape", "cu_seqlens dtype", "cu_seqlens shape",
                                  "cu_seqlens device", "max_seqlen", "prefix shape", "prefix dtype", "scale"))
def test_varlen_forward_argument_errors_name_the_op(varlen_ops, case):
    q = torch.randn(8, H, 64, device="cuda", dtype=torch.bfloat16)
    message, args = _bad_varlen_fwd_args(q, case)
    with pytest.raises(RuntimeError, match="attention_varlen_fwd_sm80") as info:
        varlen_ops.cuda_attention_varlen_fwd_sm80(*args)
    assert message in str(info.value)


def test_varlen_backward_argument_errors_name_the_op(varlen_ops):
    q = torch.randn(8, H, 64, device="cuda", dtype=torch.bfloat16)
    cu = varlen_cu((3, 5))
    out, lse = varlen_ops.cuda_attention_varlen_fwd_sm80(q, q, q, cu, 5, None, True, 0.125)
    grads = nan_varlen_grads(8, 64, torch.bfloat16)
    bwd = varlen_ops.cuda_attention_varlen_bwd_sm80
    with pytest.raises(RuntimeError, match="attention_varlen_bwd_sm80: lse must have shape"):
        bwd(out, q, q, q, out, lse.t(), cu, 5, None, True, 0.125, *grads)
    with pytest.raises(RuntimeError, match="attention_varlen_bwd_sm80: lse must be float32"):
        bwd(out, q, q, q, out, lse.double(), cu, 5, None, True, 0.125, *grads)
    with pytest.raises(RuntimeError, match="attention_varlen_bwd_sm80: dk must have shape"):
        bwd(out, q, q, q, out, lse, cu, 5, None, True, 0.125, grads[0], grads[1][:4], grads[2])
    with pytest.raises(RuntimeError, match="attention_varlen_bwd_sm80: dout must have q's dtype"):
        bwd(out.half(), q, q, q, out, lse, cu, 5, None, True, 0.125, *grads)
    with pytest.raises(RuntimeError, match="attention_varlen_bwd_sm80: cu_seqlens must be int32"):
        bwd(out, q, q, q, out, lse, cu.long(), 5, None, True, 0.125, *grads)
