"""Triton prefix-causal attention against the float64 reference: forward, dQ, dK, dV.

On CPU the real kernels run in Triton's interpreter (fp32, fp16) with the small interpreter tiles;
`gpu`-marked tests cover bf16/fp16, head dim 128 and long sequences with the autotuned configs.
"""
import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.triton_kernels import attention as common
from tests.helpers import TOLERANCE, assert_close

B, H = 2, 3


@pytest.fixture
def triton_calls(monkeypatch):
    """Run under the triton backend and count calls of its attention implementations, so a test
    fails if the reference ran instead."""
    calls = {"attention_fwd": 0, "attention_bwd": 0}
    with ak.use_backend("triton"):
        assert backend.unavailable_reason("triton") is None  # also imports the triton kernel modules
        for name in calls:
            impl = backend._REGISTRY[name]["triton"]

            def counted(*args, _impl=impl, _name=name):
                calls[_name] += 1
                return _impl(*args)

            monkeypatch.setitem(backend._REGISTRY[name], "triton", counted)
        yield calls


def _prefix(kind, S, device):
    """None (plain causal), an int applied to every sample, or per-sample random lengths in 0..S+2."""
    if kind == "random":
        return torch.randint(0, S + 3, (B,), device=device, dtype=torch.int32)
    return kind


def _prefix_cases(S):
    return sorted({0, 1, max(S - 1, 0), S, S + 5}) + ["random", None]


def _reference(q, k, v, prefix, causal, dout):
    """float64 reference output and gradients."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    prefix_t = None if prefix is None or not causal else (
        torch.full((B,), prefix, dtype=torch.int64, device=q.device) if isinstance(prefix, int) else prefix)
    out = ref.prefix_causal_attention(qd, kd, vd, prefix_t, causal)
    return (out, *torch.autograd.grad(out, (qd, kd, vd), dout.double()))


def _check(q, k, v, prefix, causal, tol, calls=None):
    for t in (q, k, v):
        t.requires_grad_()
    out = ak.prefix_causal_attention(q, k, v, prefix, causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = _reference(q, k, v, prefix, causal, dout)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        if want.norm() == 0:  # S = 1: the only key always wins, so dq = dk = 0 exactly
            assert got.abs().max() <= 1e-6, f"{name}: expected zeros"
        else:
            assert_close(got, want, tol, f"{name} S={q.shape[2]} D={q.shape[3]} prefix={prefix} causal={causal}")
    if calls is not None:
        assert calls["attention_fwd"] >= 1 and calls["attention_bwd"] >= 1, "the triton kernels did not run"
    return out


@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("S", [1, 7, 64, 67, 130])
def test_matches_reference_fp32(triton_calls, device, S, D):
    for kind in _prefix_cases(S):
        q, k, v = torch.randn(3, B, H, S, D, device=device).unbind(0)
        _check(q, k, v, _prefix(kind, S, device), True, 2e-5, triton_calls)


@pytest.mark.parametrize("S", [7, 67, 130])
def test_not_causal(triton_calls, device, S):
    q, k, v = torch.randn(3, B, H, S, 32, device=device).unbind(0)
    _check(q, k, v, None, False, 2e-5, triton_calls)


def test_int64_prefix_and_custom_scale(triton_calls, device):
    q, k, v = torch.randn(3, B, H, 67, 32, device=device).unbind(0)
    prefix = torch.tensor([40, 3], dtype=torch.int64, device=device)
    for t in (q, k, v):
        t.requires_grad_()
    out = ak.prefix_causal_attention(q, k, v, prefix, scale=0.3)
    expected = ref.prefix_causal_attention(q.double(), k.double(), v.double(), prefix, True, 0.3)
    assert_close(out, expected, 2e-5, "out with scale=0.3")
    assert triton_calls["attention_fwd"] == 1


def test_strided_qkv_from_packed_projection(triton_calls, device):
    """q, k, v as transposed slices of one (B, S, 3, H, D) tensor reach the kernel with their strides
    (no copy); gradients land in the packed tensor."""
    S, D = 67, 32
    qkv = torch.randn(B, S, 3, H, D, device=device, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D) views
    assert q.stride() == (S * 3 * H * D, D, 3 * H * D, 1)
    seen = []
    fwd = backend._REGISTRY["attention_fwd"]["triton"]

    def spy(q_, k_, v_, *rest):
        seen.append((q_.stride(), q_.data_ptr() == q.data_ptr()))
        return fwd(q_, k_, v_, *rest)

    backend._REGISTRY["attention_fwd"]["triton"] = spy
    try:
        prefix = torch.tensor([5, 50], device=device)
        out = ak.prefix_causal_attention(q, k, v, prefix)
    finally:
        backend._REGISTRY["attention_fwd"]["triton"] = fwd
    assert seen == [(q.stride(), True)], "q was copied before the kernel"
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory
    dout = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    expected = _reference(q, k, v, prefix, True, dout)
    assert_close(out, expected[0], 2e-5, "out")
    for i, name in enumerate("qkv"):
        assert_close(dqkv[:, :, i].transpose(1, 2), expected[i + 1], 2e-5, f"d{name}")


def test_hidden_keys_change_nothing_and_get_no_gradient(triton_calls, device):
    """Key j >= prefix is hidden from queries i < j: replacing it (with huge values) leaves those rows
    bit-identical, and when only those rows carry a gradient, key j gets exactly zero dK and dV."""
    S, D, j = 67, 32, 40
    prefix = torch.tensor([5, 20], device=device)
    q, k, v = torch.randn(3, B, H, S, D, device=device).unbind(0)
    out = ak.prefix_causal_attention(q, k, v, prefix)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, j], v2[:, :, j] = 1e3, -1e3
    out2 = ak.prefix_causal_attention(q, k2, v2, prefix)
    assert torch.equal(out2[:, :, :j], out[:, :, :j])
    assert not torch.allclose(out2[:, :, j:], out[:, :, j:])  # the rows that see key j do change

    for t in (q, k, v):
        t.requires_grad_()
    out = ak.prefix_causal_attention(q, k, v, prefix)
    dout = torch.randn_like(out)
    dout[:, :, j:] = 0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(dk[:, :, j], torch.zeros_like(dk[:, :, j]))
    assert torch.equal(dv[:, :, j], torch.zeros_like(dv[:, :, j]))
    assert dv[:, :, j - 1].abs().max() > 0  # key j-1 is seen by query j-1, which has a gradient
    assert triton_calls["attention_bwd"] == 1


@pytest.mark.parametrize("tiles", [
    {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)},
    {"fwd": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dq": (16, 32, 4, 1)},
], ids=["square", "transposed"])
def test_other_tile_shapes(triton_calls, device, monkeypatch, tiles):
    """The range arithmetic must hold for any power-of-two tiles, not only the default ones."""
    monkeypatch.setattr(common, "_INTERPRETER", tiles)
    S = 67
    q, k, v = torch.randn(3, B, H, S, 32, device=device).unbind(0)
    _check(q, k, v, torch.tensor([1, 33], device=device), True, 2e-5, triton_calls)


@pytest.mark.parametrize("S,D", [(67, 64), (130, 32)])
def test_fp16(triton_calls, device, S, D):
    q, k, v = torch.randn(3, B, H, S, D, device=device, dtype=torch.float16).unbind(0)
    out = _check(q, k, v, _prefix("random", S, device), True, 2e-3, triton_calls)
    assert out.dtype == torch.float16


def test_float64_falls_back_to_the_reference_with_a_warning(triton_calls, device):
    q, k, v = torch.randn(3, B, H, 7, 16, device=device, dtype=torch.float64).unbind(0)
    common.warn_fallback_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="float64"):
        out = ak.prefix_causal_attention(q, k, v, 3)
    assert_close(out, ref.prefix_causal_attention(q, k, v, torch.full((B,), 3)), 1e-12, "float64 out")


@pytest.mark.parametrize("S", [1, 7, 67, 130])
@pytest.mark.parametrize("tile", [(16, 32), (32, 16), (64, 64)])
def test_tile_classification_matches_dense_mask(S, tile):
    """The rule of `key_ranges` (mirrored by `tile_work`): skipped tiles hold no visible pair and
    unmasked tiles hold only visible pairs, for every prefix."""
    bm, bn = tile
    for prefix in range(0, S + 2):
        visible = ref.prefix_visibility(S, torch.tensor([prefix]))[0]  # (S, S)
        for m0 in range(0, S, bm):
            full_end = (min(max(m0 + 1, prefix), S) // bn) * bn
            hi = max(min(m0 + bm, S), prefix)
            rows = visible[m0:m0 + bm]
            assert rows[:, :full_end].all(), (prefix, m0)
            assert not rows[:, hi:].any(), (prefix, m0)
        for n0 in range(0, S, bn):  # `query_ranges`, the dK/dV side
            n1 = min(n0 + bn, S)
            lo = (0 if n0 < prefix else n0) // bm * bm
            first_full = 0 if n1 <= prefix else n1 - 1
            full_start = max(-(-first_full // bm) * bm, lo)
            cols = visible[:, n0:n1]
            assert not cols[:lo].any() and cols[full_start:].all(), (prefix, n0)
    for tile, numbers in (((128, 64), (0.84, 0.37)), ((64, 32), (0.76, 0.19))):  # as quoted in attention.py
        computed, masked, dense = map(sum, zip(*(common.tile_work(256, p, *tile) for p in range(1, 256))))
        assert (round(computed / dense, 2), round(masked / dense, 2)) == numbers


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,D,batch,heads", [(256, 128, 4, 8), (334, 128, 2, 8), (256, 64, 4, 8), (4096, 128, 1, 2), (1000, 256, 1, 2)])
def test_gpu_low_precision(triton_calls, S, D, batch, heads, dtype):
    q, k, v = torch.randn(3, batch, heads, S, D, device="cuda", dtype=dtype).unbind(0)
    prefix = torch.randint(1, S, (batch,), device="cuda")
    for t in (q, k, v):
        t.requires_grad_()
    out = ak.prefix_causal_attention(q, k, v, prefix)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = ref.prefix_causal_attention(qf, kf, vf, prefix)
    want_grads = torch.autograd.grad(want, (qf, kf, vf), dout.float())
    assert_close(out, want, TOLERANCE[dtype], f"out {dtype} S={S} D={D}")
    for name, got, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(got, w, 2 * TOLERANCE[dtype], f"{name} {dtype} S={S} D={D}")
    assert triton_calls["attention_fwd"] == 1 and triton_calls["attention_bwd"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32,tol", [(False, 2e-5), (True, 3e-3)])
def test_gpu_fp32(triton_calls, monkeypatch, allow_tf32, tol):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    q, k, v = torch.randn(3, 2, 4, 334, 64, device="cuda").unbind(0)
    _check(q, k, v, torch.tensor([1, 200], device="cuda"), True, tol, triton_calls)


@pytest.mark.gpu
def test_gpu_prefix_values_do_not_recompile(triton_calls):
    from aimv2_kernels.triton_kernels.attention_fwd import attention_fwd_kernel

    q, k, v = torch.randn(3, 2, 2, 256, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    ak.prefix_causal_attention(q, k, v, torch.tensor([3, 100], device="cuda"))
    compiled = sum(len(cache[0]) for cache in attention_fwd_kernel.device_caches.values())
    ak.prefix_causal_attention(q, k, v, torch.tensor([250, 7], device="cuda"))
    assert sum(len(cache[0]) for cache in attention_fwd_kernel.device_caches.values()) == compiled
