"""The Hopper (sm_90a) attention kernels of csrc/attention_sm90.cu, called as the compiled ops
`cuda_attention_fwd_sm90` / `cuda_attention_bwd_sm90` (and their varlen forms) directly, not through
the backend registry.

Against the float64 reference with FlashAttention's rule: the kernel's error (relative error norm and
worst element) is at most twice that of PyTorch computing the same attention in the low dtype, plus a
1e-3 floor. bf16 and fp16, head dims 64 and 128, B = 2, H = 3, S from 1 to 1024 (and one 4096 case),
prefixes 0, 1, S - 1, S, S + 5, per-sample random and none, bidirectional, q/k/v as the strided views
of one packed (B, S, 3, H, D) projection, gradients written into NaN-filled (possibly packed) buffers;
packed variable-length sequences (T, H, D) with their gradients in one packed (T, 3, H, D) buffer.

Every case with a backward runs in both of its designs (the `design` fixture: the op's trailing
`deterministic` argument): the 5-GEMM one (dQ by float32 atomics inside the dK/dV kernel, the default
of the "cuda" backend) and the deterministic 7-GEMM one (the op's default). The deterministic design
must repeat its bits; the atomic one must match the reference on every run and repeat dK and dV
bitwise (only dQ is summed by atomics).

Everything skips unless a CUDA device of compute capability 9.0 is present and the extension loads;
on such a machine a build without sm_90a device code fails `test_build_has_sm90a_device_code`.
"""
from __future__ import annotations

import functools

import pytest
import torch
from cuda_attention_cases import (B, FLOOR, HEAD_DIMS, PREFIXES, H, AttentionPath, accuracy_grid, make_prefix,
                                  make_qkv, make_varlen_prefix, make_varlen_qkv, varlen_cu)

SM90 = AttentionPath("sm90", runs_on=lambda capability: capability == (9, 0), needs="an sm_90 GPU",
                     lse_bound=lambda lse_max: FLOOR * max(1.0, lse_max))
PREFIX_DTYPE = torch.int32  # of the prefix cases, unless a test says otherwise
# packed sequences: tile-straddling lengths, a single row, an empty sequence, one past a 256-row tile
VARLEN_LENGTHS = (67, 1, 0, 300, 7, 130)

# buffers the launchers allocate start as NaN bytes (tests/conftest.py)
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_cuda_outputs")]


class BoundDesign:
    """torch.ops.aimv2_kernels with the Hopper backward ops' `deterministic` argument fixed, so that
    `SM90.check` and `SM90.check_varlen` run one backward design."""

    BWD_OPS = ("cuda_attention_bwd_sm90", "cuda_attention_varlen_bwd_sm90")

    def __init__(self, ops, deterministic: bool):
        self.ops, self.deterministic = ops, deterministic

    def __getattr__(self, name):
        op = getattr(self.ops, name)
        return functools.partial(op, deterministic=self.deterministic) if name in self.BWD_OPS else op


@pytest.fixture(scope="module")
def ops():
    return SM90.ops_or_skip()


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


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def design(request, sm90):
    """The ops with the backward bound to one design; a test taking it runs in both."""
    return BoundDesign(sm90, request.param)


def backward(ops, q, k, v, out, lse, dout, prefix, scale, deterministic):
    """(dq, dk, dv) of the Hopper backward in one design, into fresh buffers."""
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    ops.cuda_attention_bwd_sm90(dout, q, k, v, out, lse, prefix, True, scale, *grads, deterministic=deterministic)
    return grads


# ---- tests -----------------------------------------------------------------------------------------

def test_build_has_sm90a_device_code(ops):
    """On an H100/H200 with the extension loaded, the sm_90 ops must run (a build for "9.0" without
    the "a" compiles the Hopper kernels empty and the ops refuse with this message)."""
    q = torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    ops.cuda_attention_fwd_sm90(q, q, q, None, True, 0.125)


@accuracy_grid(prefixes=True)
def test_forward_and_backward(design, dtype, D, S, prefix_kind):
    q, k, v = make_qkv(S, D, dtype)
    prefix = make_prefix(prefix_kind, S, PREFIX_DTYPE)
    scale = D**-0.5
    SM90.check(design, q, k, v, prefix, True, scale, f"{dtype} D={D} S={S} prefix={prefix_kind}")


@accuracy_grid(prefixes=False)
def test_bidirectional(design, dtype, D, S):
    """causal=False: every key visible; a prefix, if passed, changes nothing."""
    q, k, v = make_qkv(S, D, dtype, seed=1)
    prefix = make_prefix("1", S, PREFIX_DTYPE)
    SM90.check(design, q, k, v, prefix, False, D**-0.5, f"bidirectional {dtype} D={D} S={S}")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_contiguous_inputs_int64_prefix_and_other_scale(design, D):
    S = 200
    q, k, v = make_qkv(S, D, torch.bfloat16, layout="contiguous", seed=2)
    prefix = make_prefix("random", S, torch.int64)
    SM90.check(design, q, k, v, prefix, True, 0.3, f"contiguous D={D}")


def test_strided_prefix_tensor(design):
    S = 150
    q, k, v = make_qkv(S, 64, torch.bfloat16, seed=3)
    wide = torch.tensor([[37, -1], [140, -1]], device="cuda", dtype=torch.int32)
    prefix = wide[:, 0]  # stride 2
    out, lse, dout, grads = SM90.run(design, q, k, v, prefix, True, 0.125)
    SM90.compare(q, k, v, prefix.contiguous(), True, 0.125, out, lse, dout, grads, "strided prefix")


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_gradients_into_one_packed_buffer(design, D):
    """dq, dk, dv as the views of one (B, H, S, 3, D) buffer (what the autograd op passes for packed
    projections), NaN-filled: every element must be written, none of another gradient's."""
    S = 130
    q, k, v = make_qkv(S, D, torch.bfloat16, seed=4)
    packed = torch.full((B, S, 3, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    grads = tuple(t.transpose(1, 2) for t in packed.unbind(2))
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    SM90.check(design, q, k, v, prefix, True, D**-0.5, f"packed grads D={D}", grads=grads)
    assert torch.isfinite(packed).all()


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_long_sequence(design, D):
    S = 4096
    q, k, v = make_qkv(S, D, torch.bfloat16, seed=5)
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    SM90.check(design, q, k, v, prefix, True, D**-0.5, f"S=4096 D={D}")


def test_backward_is_deterministic(sm90):
    """The deterministic design (also the op's default) writes the same bits on every run."""
    S = 300
    q, k, v = make_qkv(S, 128, torch.bfloat16, seed=6)
    prefix = make_prefix("random", S, PREFIX_DTYPE)
    out, lse = sm90.cuda_attention_fwd_sm90(q, k, v, prefix, True, 0.09)
    dout = torch.randn_like(out)
    results = [backward(sm90, q, k, v, out, lse, dout, prefix, 0.09, deterministic=True) for _ in range(2)]
    default = tuple(torch.empty_like(t) for t in (q, k, v))
    sm90.cuda_attention_bwd_sm90(dout, q, k, v, out, lse, prefix, True, 0.09, *default)
    for other in (results[1], default):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_atomic_design_matches_the_reference_on_every_run(sm90):
    """The 5-GEMM design: dQ's float32 atomic sums may change order (and last bits) from run to run,
    so each run is checked against the reference; dK and dV have no atomics and repeat bitwise. Many
    key tiles add into each dQ row here (S = 1000: 8 key tiles, plain causal and a long prefix)."""
    S, scale = 1000, 0.09
    q, k, v = make_qkv(S, 128, torch.bfloat16, seed=8)
    prefix = torch.tensor([900, 0], device="cuda", dtype=PREFIX_DTYPE)
    out, lse = sm90.cuda_attention_fwd_sm90(q, k, v, prefix, True, scale)
    dout = torch.randn_like(out)
    runs = [backward(sm90, q, k, v, out, lse, dout, prefix, scale, deterministic=False) for _ in range(3)]
    for i, grads in enumerate(runs):
        SM90.compare(q, k, v, prefix, True, scale, out, lse, dout, grads, f"atomic run {i}")
        assert torch.equal(grads[1], runs[0][1]) and torch.equal(grads[2], runs[0][2])


@pytest.mark.parametrize("prefix_kind", PREFIXES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_varlen_forward_and_backward(design, D, prefix_kind):
    """Packed sequences (T, H, D), one launch per kernel for all of them, the gradients written into
    the NaN-filled views of one packed (T, 3, H, D) buffer: against the float64 reference."""
    q, k, v = make_varlen_qkv(VARLEN_LENGTHS, D, torch.bfloat16, seed=9)
    prefix = make_varlen_prefix(prefix_kind, VARLEN_LENGTHS, PREFIX_DTYPE)
    SM90.check_varlen(design, q, k, v, varlen_cu(VARLEN_LENGTHS), prefix, True, D**-0.5,
                      f"varlen D={D} prefix={prefix_kind}")


def test_last_key_changes_only_the_last_row(sm90):
    """Plain causal: the last key is visible only to the last query, and the tiles of the other rows
    never load it: their output is bit-identical when it changes."""
    S = 257
    q, k, v = make_qkv(S, 64, torch.bfloat16, seed=7)
    out1, _ = sm90.cuda_attention_fwd_sm90(q, k, v, None, True, 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 3.0
    v2[:, :, -1] -= 2.0
    out2, _ = sm90.cuda_attention_fwd_sm90(q, k2, v2, None, True, 0.125)
    assert torch.equal(out1[:, :, :-1], out2[:, :, :-1])
    assert not torch.equal(out1[:, :, -1], out2[:, :, -1])


def test_bad_inputs_are_clear_errors(sm90):
    q, k, v = make_qkv(16, 64, torch.bfloat16, layout="contiguous")
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
