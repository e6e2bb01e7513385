"""Triton prefix-causal attention against the float64 reference: forward, dQ, dK, dV.

Every test runs on the `device` fixture's device: without a GPU the real kernels run in Triton's
interpreter on CPU tensors (fp32, fp16) with the small interpreter tiles, with one the compiled kernels
run on CUDA tensors with the autotuned configs; `gpu`-marked tests add bf16/fp16, head dim 128 and
long sequences. The launchers' outputs start as NaN (`poisoned_outputs`), so an element no kernel
writes cannot pass.
"""
import pytest
import torch
import triton
import triton.language as tl

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.triton_backend import attention as common
from aimv2_kernels.triton_backend.attention import key_ranges, query_ranges, visible_prefix
from aimv2_kernels.triton_backend.common import poisoned_outputs
from tests.helpers import TOLERANCE, assert_close

B, H = 2, 3


@pytest.fixture(params=["atomic", "deterministic"])
def backward_path(request, monkeypatch):
    """Each test runs both backward designs (attention_bwd.py): dQ by atomics (the default) and the
    deterministic one (AIMV2_KERNELS_DETERMINISTIC=1)."""
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if request.param == "deterministic" else "0")
    return request.param


@pytest.fixture
def triton_calls(monkeypatch, backward_path):
    """Run under the triton backend, with poisoned outputs, and count calls of its attention
    implementations, so a test fails if the reference ran instead."""
    calls = {"attention_fwd": 0, "attention_bwd": 0}
    with ak.use_backend("triton"), poisoned_outputs():
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
    # S = 1: the only key always wins, so dq = dk = 0 in exact arithmetic; computed, they are
    # scale * (dO.v - rowsum(dO * O)) * k, a difference of two roundings of the same dot product.
    # Bound them relative to that product's size, not absolutely.
    unit = float(dout.abs().max() * v.detach().abs().max() * k.detach().abs().max())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        if want.norm() == 0:
            assert torch.isfinite(got).all() and got.abs().max() <= 1e-5 * unit, \
                f"{name}: expected zeros, got up to {float(got.abs().max()):.3e} (unit {unit:.3e})"
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
    {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "bwd": (16, 16, 4, 1)},
    {"fwd": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "bwd": (32, 16, 4, 1)},
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


@triton.jit
def _tile_ranges_kernel(PREFIX, OUT, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[b, t] = (full_end, hi) of query tile t and (lo, full_start) of key block t for the prefix
    PREFIX[b], computed by the attention kernels' own helpers (visible_prefix clamps as they do)."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    prefix = visible_prefix(PREFIX, b, S, True, CAUSAL)
    full_end, hi = key_ranges(t * BLOCK_M, prefix, S, BLOCK_M, BLOCK_N)
    lo, full_start = query_ranges(t * BLOCK_N, prefix, S, BLOCK_M, BLOCK_N)
    out = OUT + (b * tl.num_programs(0) + t) * 4
    tl.store(out, full_end)
    tl.store(out + 1, hi)
    tl.store(out + 2, lo)
    tl.store(out + 3, full_start)


def kernel_tile_ranges(S, prefixes, block_m, block_n, device, causal=True):
    """The helpers' answers for every tile and prefix: a (len(prefixes), tiles, 4) int tensor."""
    prefix = torch.tensor(prefixes, dtype=torch.int32, device=device)
    tiles = max(triton.cdiv(S, block_m), triton.cdiv(S, block_n))
    out = torch.full((len(prefixes), tiles, 4), -1, dtype=torch.int32, device=device)
    _tile_ranges_kernel[(tiles, len(prefixes))](prefix, out, S, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n)
    return out.cpu()


@pytest.mark.parametrize("S", [1, 7, 67, 130])
@pytest.mark.parametrize("tile", [(16, 32), (32, 16), (64, 64)])
def test_tile_classification_matches_dense_mask(device, S, tile):
    """What `key_ranges` and `query_ranges` return inside a kernel, for every prefix 0..S+1 and without
    causality: skipped tiles hold no visible pair, unmasked tiles only visible pairs. And `tile_work`,
    which the docstring's numbers come from, counts the tiles those ranges make the kernels visit."""
    bm, bn = tile
    prefixes = list(range(S + 2))
    ranges = kernel_tile_ranges(S, prefixes, bm, bn, device)
    cases = [(p, ranges[i], ref.prefix_visibility(S, torch.tensor([p]))[0]) for i, p in enumerate(prefixes)]
    cases.append((S, kernel_tile_ranges(S, [0], bm, bn, device, causal=False)[0], torch.ones(S, S, dtype=torch.bool)))
    for prefix, r, visible in cases:  # visible: (S, S), query x key
        computed = masked = 0
        for t, m0 in enumerate(range(0, S, bm)):
            full_end, hi = int(r[t, 0]), int(r[t, 1])
            rows = visible[m0:m0 + bm]
            assert full_end % bn == 0 and 0 <= full_end <= hi <= S, (prefix, m0, full_end, hi)
            assert rows[:, :full_end].all(), (prefix, m0, full_end)
            assert not rows[:, hi:].any(), (prefix, m0, hi)
            computed += -(-hi // bn)
            masked += -(-hi // bn) - full_end // bn
        assert (computed, masked) == common.tile_work(S, prefix, bm, bn)[:2], prefix
        for t, n0 in enumerate(range(0, S, bn)):  # the dK/dV side
            lo, full_start = int(r[t, 2]), int(r[t, 3])
            cols = visible[:, n0:n0 + bn]
            assert lo % bm == 0 and full_start % bm == 0 and lo <= full_start, (prefix, n0, lo, full_start)
            assert not cols[:lo].any() and cols[full_start:].all(), (prefix, n0, lo, full_start)
    for tile, numbers in (((128, 64), (0.84, 0.37)), ((64, 32), (0.76, 0.19))):  # as quoted in attention.py
        computed, masked, dense = map(sum, zip(*(common.tile_work(256, p, *tile) for p in range(1, 256))))
        assert (round(computed / dense, 2), round(masked / dense, 2)) == numbers


# ---- the two backward designs -------------------------------------------------------------------

def test_torch_compile(triton_calls, device):
    """The custom ops under torch.compile (not the eager fast path), in both backward designs."""
    S = 67
    q, k, v = (torch.randn(B, H, S, 32, device=device, requires_grad=True) for _ in range(3))
    prefix = torch.tensor([3, 40], device=device)
    compiled = torch.compile(lambda q, k, v: ak.prefix_causal_attention(q, k, v, prefix), fullgraph=True,
                             backend="aot_eager")
    out = compiled(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), _reference(q, k, v, prefix, True, dout)):
        assert_close(got, want, 2e-5, f"{name} under torch.compile")
    assert triton_calls["attention_fwd"] == 1 and triton_calls["attention_bwd"] == 1


@pytest.mark.parametrize("torch_switch,env,want", [
    (False, None, ["bwd"]), (False, "0", ["bwd"]), (True, None, ["dkdv", "dq"]), (False, "1", ["dkdv", "dq"]),
])
def test_deterministic_algorithms_pick_the_backward(monkeypatch, torch_switch, env, want):
    """PyTorch's switch or AIMV2_KERNELS_DETERMINISTIC=1 runs dK/dV and dQ as two kernels (no
    atomics); otherwise one kernel ("bwd") adds dQ with atomics. Read at each backward call."""
    from aimv2_kernels.triton_backend import attention_bwd

    launched = []
    real_launch = attention_bwd.launch
    monkeypatch.setattr(attention_bwd, "launch", lambda fn, kernel, *a: (launched.append(kernel), real_launch(fn, kernel, *a)))
    if env is None:
        monkeypatch.delenv(backend.DETERMINISTIC_ENV, raising=False)
    else:
        monkeypatch.setenv(backend.DETERMINISTIC_ENV, env)
    q, k, v = (torch.randn(1, 1, 40, 16, requires_grad=True) for _ in range(3))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_switch)
    try:
        with ak.use_backend("triton"):
            ak.prefix_causal_attention(q, k, v, 5).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert launched == want


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_repeatable(monkeypatch):
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1")
    q, k, v = (torch.randn(4, 8, 334, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    prefix = torch.randint(1, 334, (4,), device="cuda")
    dout = torch.randn(4, 8, 334, 128, device="cuda", dtype=torch.bfloat16)
    with ak.use_backend("triton"):
        runs = [torch.autograd.grad(ak.prefix_causal_attention(q, k, v, prefix), (q, k, v), dout) for _ in range(3)]
    for grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], grads))


# ---- the prefix check: one launch on CUDA --------------------------------------------------------

@pytest.mark.skipif(not backend.interpreter_enabled(), reason="runs the kernel in TRITON_INTERPRET=1")
def test_prefix_check_kernel_asserts_on_a_negative_length(monkeypatch):
    from triton.runtime import interpreter
    from triton.runtime.errors import InterpreterError

    from aimv2_kernels.triton_backend.prefix_check import prefix_check_kernel

    # The interpreter runs device asserts only with its own debug option (on a GPU the kernel's
    # debug=True compiles them in).
    monkeypatch.setattr(interpreter.interpreter_builder, "options", interpreter.InterpreterOptions(debug=True))
    good = torch.tensor([0, 5, 3000], dtype=torch.int32)
    prefix_check_kernel[(1,)](good, 3, 1, BLOCK=2)  # two loop steps, the second one masked
    bad = torch.tensor([[0, 9], [5, 9], [-1, 9]])[:, 0]  # int64, a strided view, the negative one last
    with pytest.raises(InterpreterError, match="prefix_len must be >= 0"):  # the interpreter's AssertionError
        prefix_check_kernel[(1,)](bad, 3, bad.stride(0), BLOCK=2)


def test_prefix_check_resolves_to_one_launch_on_cuda_and_the_host_check_on_cpu():
    with ak.use_backend("triton"):
        assert backend.unavailable_reason("triton") is None
        assert backend.resolve("prefix_check", torch.device("cuda"))[0] == "triton"
        # on the CPU the triton implementation defers to the host check: a ValueError at once
        name, check = backend.resolve("prefix_check", torch.device("cpu"))
        with pytest.raises(ValueError, match="prefix_len must be >= 0 for every sample"):
            check(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="prefix_len must be >= 0"):
        ak.prefix_causal_attention(*torch.randn(3, 2, 1, 8, 16).unbind(0), torch.tensor([3, -1]))


@pytest.mark.gpu
def test_gpu_negative_prefix_fails_the_device_assert():
    """In a child process: a device assert leaves the CUDA context unusable."""
    import subprocess
    import sys

    code = ("import torch, aimv2_kernels as ak\n"
            "q = torch.randn(2, 2, 64, 64, device='cuda', dtype=torch.bfloat16)\n"
            "with ak.use_backend('triton'):\n"
            "    ak.prefix_causal_attention(q, q, q, torch.tensor([3, -1], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "prefix_len must be >= 0" in run.stdout + run.stderr, run.stderr[-2000:]


# ---- recompilation: prefix values never reach the compiler --------------------------------------

class _ArgumentSpy:
    """Stands in for a @triton.jit kernel: records what a compiled kernel is specialized on (dtypes
    and 16-byte alignment of tensors, values of everything else, constexprs included), then launches.
    Both launch routes end in `run` (`kernel[grid](...)`, and the heuristics wrapper of the tiled
    kernels, which also reads `arg_names`)."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen
        self.arg_names = kernel.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

    def run(self, *args, grid, warmup, **kwargs):
        def key(a):
            if isinstance(a, torch.Tensor):
                return ("tensor", a.dtype, a.data_ptr() % 16 == 0)
            return a
        self.seen.append((tuple(map(key, args)), tuple(sorted((k, key(v)) for k, v in kwargs.items()))))
        return self.kernel.run(*args, grid=grid, warmup=warmup, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the launch arguments are spied on the interpreter's direct launches; "
                                     "on a GPU test_gpu_prefix_values_do_not_recompile counts real compilations")
def test_prefix_values_do_not_change_the_launch_signature(triton_calls, monkeypatch):
    """Every kernel launch of forward and backward gets the same non-tensor arguments and constexprs
    whatever the prefix values (none, all visible, beyond S, mixed): a launcher that turned a value
    into a constexpr or a branch (say, no prefix when all are 0) would recompile on a GPU and fail here."""
    from aimv2_kernels.triton_backend import attention_bwd, attention_fwd

    S = 67
    q, k, v = (t.requires_grad_() for t in torch.randn(3, B, H, S, 32).unbind(0))
    signatures = []
    for values in ([3, 40], [0, 0], [S, S + 9], [1, 0]):
        seen = []
        with monkeypatch.context() as m:
            for module, names in ((attention_fwd, ["attention_fwd_kernel"]),
                                  (attention_bwd, ["attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel",
                                                   "attention_bwd_dq_kernel", "attention_bwd_dq_convert_kernel"])):
                for name in names:
                    m.setattr(module, name, _ArgumentSpy(getattr(module, name), seen))
            out = ak.prefix_causal_attention(q, k, v, torch.tensor(values, dtype=torch.int32))
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert len(seen) == 4, "expected four launches: forward, preprocess, dK/dV, dQ (or its conversion)"
        signatures.append(seen)
    for values, seen in zip(([0, 0], [S, S + 9], [1, 0]), signatures[1:]):
        assert seen == signatures[0], f"prefix values {values} changed a kernel's launch signature"


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


def _compiled_kernels(*kernels) -> int:
    """Compiled variants held by the kernels' in-memory caches (triton 3.6 to 3.9: device_caches maps a
    device to a tuple whose first entry is the dict of compiled kernels)."""
    return sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())


@pytest.mark.gpu
def test_gpu_prefix_values_do_not_recompile(triton_calls):
    """Counts real compilations: new prefix values (none visible, all, mixed) add none, while a launch
    that must compile (causal=False changes a constexpr) adds some, so the count is known to see them."""
    from aimv2_kernels.triton_backend.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
    from aimv2_kernels.triton_backend.attention_fwd import attention_fwd_kernel

    kernels = (attention_fwd_kernel, attention_bwd_dkdv_kernel, attention_bwd_dq_kernel)
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 2, 256, 64, device="cuda", dtype=torch.bfloat16).unbind(0))

    def step(prefix, causal=True):
        out = ak.prefix_causal_attention(q, k, v, prefix, causal=causal)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()

    step(torch.tensor([3, 100], device="cuda", dtype=torch.int32))
    compiled = _compiled_kernels(*kernels)
    assert compiled >= 3, f"the cache count does not see the compiled kernels ({compiled})"
    for values in ([250, 7], [0, 0], [256, 1000], [1, 255]):
        step(torch.tensor(values, device="cuda", dtype=torch.int32))
        assert _compiled_kernels(*kernels) == compiled, f"prefix values {values} compiled a new kernel"
    step(None, causal=False)
    assert _compiled_kernels(*kernels) > compiled, "a new constexpr compiled nothing: the count sees no compilation"
