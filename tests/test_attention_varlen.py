"""ak.prefix_causal_attention_varlen on the "torch" and "triton" backends: packed sequences against a
dense oracle.

The oracle is written here, not taken from the reference: one (T, T) mask over the whole packed
batch (same sequence, and the prefix rule on positions counted from the sequence start), one softmax.
A reference that let a key leak across a sequence boundary would differ from it. The correctness
tests run on both backends (`impl`): "triton" runs the real kernels, in Triton's interpreter on CPU
tensors in fp32 (bf16 dots are broken there), with poisoned outputs and a count of the registry
calls, so a silent fallback to the reference fails. The float64 gradcheck runs on CPU tensors on
every machine (as in test_ops_layer.py); every other test runs on the `device` fixture's device.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.ops import attention_varlen
from aimv2_kernels.triton_backend.common import poisoned_outputs
from tests.helpers import assert_error_names

H, D = 2, 16
VARLEN_KERNELS = ("attention_varlen_fwd", "attention_varlen_bwd")


@pytest.fixture(params=["torch", "triton", "triton-deterministic"])
def impl(request, monkeypatch):
    """Run the test under this backend; for "triton", with poisoned outputs and counting the calls of
    its varlen implementations (yields {kernel: calls}, checked by `_assert_launched`). "triton" runs
    the default backward (dQ by atomics), "triton-deterministic" the deterministic one."""
    if request.param == "torch":
        with ak.use_backend("torch"):
            yield None
        return
    if backend.unavailable_reason("triton") is not None:  # also imports the triton kernel modules
        pytest.skip(backend.unavailable_reason("triton"))
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if request.param == "triton-deterministic" else "0")
    calls = dict.fromkeys(VARLEN_KERNELS, 0)
    with ak.use_backend("triton"), poisoned_outputs():
        for name in VARLEN_KERNELS:
            def counted(*args, _impl=backend._REGISTRY[name]["triton"], _name=name):
                calls[_name] += 1
                return _impl(*args)

            monkeypatch.setitem(backend._REGISTRY[name], "triton", counted)
        yield calls


def _assert_launched(calls, backward=True):
    """Under "triton", the Triton implementations (not the reference) ran forward and backward."""
    if calls is not None:
        assert calls["attention_varlen_fwd"] >= 1, "the triton forward did not run"
        assert not backward or calls["attention_varlen_bwd"] >= 1, "the triton backward did not run"


def _cu(lengths, device="cpu"):
    """(n + 1,) int32 boundaries of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _qkv(T, device, dtype=torch.float32, grad=False):
    return [torch.randn(T, H, D, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def _dense_oracle(q, k, v, cu_seqlens, prefix_len, causal, scale=None):
    """float64 attention over all T tokens with one block-diagonal prefix-causal mask; (T, H, D)."""
    T = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # (n,)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)  # (T,) sequence id
    pos = torch.arange(T, device=q.device) - cu_seqlens[:-1].long()[seq]  # (T,) position in its sequence
    i, j = pos.view(T, 1), pos.view(1, T)
    visible = j <= i
    if prefix_len is not None:
        visible = visible | (j < prefix_len.long()[seq].view(1, T))
    if not causal:
        visible = torch.ones_like(visible)
    visible = visible & (seq.view(T, 1) == seq.view(1, T))  # (T, T): nothing across sequences
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double()) * scale  # (H, T, T)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v.double())


def _prefix_for(prefix, lengths, device):
    """The test's prefix spec -> what the op takes (None, an int, or an int tensor (n,))."""
    if prefix == "edges":  # 0, 1, len - 1, len and beyond, cycling over the sequences
        picks = [lambda n: 0, lambda n: 1, lambda n: max(n - 1, 0), lambda n: n, lambda n: n + 5]
        return torch.tensor([picks[s % 5](n) for s, n in enumerate(lengths)], device=device)
    if prefix == "random":
        return torch.tensor([int(torch.randint(0, n + 3, ())) for n in lengths], dtype=torch.int32, device=device)
    return prefix


CASES = {
    "many_short": [int(n) for n in torch.randint(1, 10, (24,), generator=torch.Generator().manual_seed(1))],
    "one_long": [130],
    "long_among_short": [3, 1, 130, 2],
    "empty_sequences": [0, 5, 0, 0, 17, 0],
    "not_multiples_of_16": [17, 33, 1, 15, 47],
    "edges": [7, 9, 13, 20, 5, 1, 2],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prefix", [None, 0, 1, 3, "edges", "random"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_dense_oracle_forward_and_backward(impl, device, case, prefix, causal):
    lengths = CASES[case]
    cu, T = _cu(lengths, device), sum(lengths)
    q, k, v = _qkv(T, device, grad=True)
    prefix_len = _prefix_for(prefix, lengths, device)
    out = ak.prefix_causal_attention_varlen(q, k, v, cu, max(lengths), prefix_len, causal=causal)
    expected = _dense_oracle(q, k, v, cu, _as_tensor(prefix_len, len(lengths), device), causal)
    assert out.shape == (T, H, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=5e-5, rtol=5e-4, msg=lambda m: f"d{name}: {m}")
    _assert_launched(impl)


def _as_tensor(prefix_len, n, device):
    return torch.full((n,), prefix_len, device=device) if isinstance(prefix_len, int) else prefix_len


@pytest.mark.parametrize("prefix", [None, 2, "edges"])
def test_matches_the_padded_op(impl, device, prefix):
    # Padding each sequence to the longest and running the padded op gives the same rows, once a
    # prefix is clamped to the sequence length (in the padded batch it would uncover padding keys).
    lengths = CASES["edges"] + [0]
    cu, T, L = _cu(lengths, device), sum(lengths), max(lengths)
    q, k, v = _qkv(T, device)
    prefix_len = _as_tensor(_prefix_for(prefix, lengths, device), len(lengths), device)
    out = ak.prefix_causal_attention_varlen(q, k, v, cu, L, prefix_len)
    padded = [torch.zeros(len(lengths), H, L, D, device=device) for _ in range(3)]
    for s, (start, n) in enumerate(zip(cu.tolist(), lengths)):
        for dst, src in zip(padded, (q, k, v)):
            dst[s, :, :n] = src[start : start + n].transpose(0, 1)
    lens = torch.tensor(lengths, device=device)
    clamped = None if prefix_len is None else torch.minimum(prefix_len, lens)
    padded_out = ak.prefix_causal_attention(*padded, clamped)
    for s, (start, n) in enumerate(zip(cu.tolist(), lengths)):
        torch.testing.assert_close(out[start : start + n], padded_out[s, :, :n].transpose(0, 1), atol=1e-5, rtol=1e-4)
    _assert_launched(impl, backward=False)


def test_strided_views_of_packed_qkv(impl, device):
    lengths = [5, 0, 19, 8]
    cu, T = _cu(lengths, device), sum(lengths)
    qkv = torch.randn(T, 3, H, D, device=device, requires_grad=True)  # one projection's output
    q, k, v = qkv.unbind(1)  # (T, H, D) views, token stride 3 * H * D
    assert not q.is_contiguous()
    prefix_len = torch.tensor([2, 0, 7, 30], device=device)
    out = ak.prefix_causal_attention_varlen(q, k, v, cu, 19, prefix_len)
    expected = _dense_oracle(q, k, v, cu, prefix_len, True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-4)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    (want,) = torch.autograd.grad(expected, qkv, dout.double())
    torch.testing.assert_close(grad.double(), want.double(), atol=5e-5, rtol=5e-4)
    _assert_launched(impl)


@pytest.mark.parametrize("prefix_layout", ["strided", "expanded"])
def test_strided_cu_seqlens_and_prefix_len(impl, device, prefix_layout):
    """The small side inputs as views: cu_seqlens every other element of a larger tensor with a
    storage offset, prefix_len strided or expanded from one value."""
    lengths = [6, 0, 21, 9]
    cu_dense = _cu(lengths, device)
    holder = torch.full((2 * len(cu_dense) + 3,), 999, dtype=torch.int32, device=device)
    holder[3::2] = cu_dense
    cu = holder[3::2]  # stride 2, offset 3: reading by element index gives 999s
    assert cu.stride(0) == 2 and cu.storage_offset() == 3
    if prefix_layout == "strided":
        prefix_len = torch.tensor([4, 77, 0, 77, 30, 77, 2, 77], device=device)[::2]
    else:
        prefix_len = torch.tensor([3], device=device).expand(len(lengths))
    T = sum(lengths)
    q, k, v = _qkv(T, device, grad=True)
    out = ak.prefix_causal_attention_varlen(q, k, v, cu, max(lengths), prefix_len)
    expected = _dense_oracle(q, k, v, cu_dense, prefix_len.contiguous(), True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-4)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=5e-5, rtol=5e-4)
    _assert_launched(impl)


def test_all_sequences_empty(impl, device):
    q, k, v = _qkv(0, device, grad=True)
    out = ak.prefix_causal_attention_varlen(q, k, v, _cu([0, 0], device), 0, 1)
    assert out.shape == (0, H, D)
    out.sum().backward()
    assert q.grad.shape == (0, H, D)
    _assert_launched(impl)


def test_larger_max_seqlen_changes_nothing(impl, device):
    lengths = [4, 9]
    cu, T = _cu(lengths, device), sum(lengths)
    q, k, v = _qkv(T, device)
    exact = ak.prefix_causal_attention_varlen(q, k, v, cu, 9, 3)
    torch.testing.assert_close(ak.prefix_causal_attention_varlen(q, k, v, cu, 1000, 3), exact, atol=0, rtol=0)
    _assert_launched(impl, backward=False)


def test_backend_choice_resolution(device):
    # On CUDA tensors "triton" and "auto" (Triton first until measured) run Triton, "cuda" its own
    # kernels (which hand these fp32 inputs on to Triton: tests/test_cuda_attention*.py check the
    # kernels); CPU tensors reach Triton only when "triton" is chosen explicitly under the interpreter,
    # and run the reference otherwise.
    lengths = [6, 0, 11]
    cu, T = _cu(lengths, device), sum(lengths)
    q, k, v = _qkv(T, device)
    for name in ("triton", "cuda", "auto"):
        if ak.unavailable_reason(name) is not None:
            continue
        if q.is_cuda:
            expected = "cuda" if name == "cuda" else "triton"
        else:
            expected = "triton" if name == "triton" else "torch"
        with ak.use_backend(name):
            assert backend.resolve("attention_varlen_fwd", q.device)[0] == expected
            assert backend.resolve("attention_varlen_bwd", q.device)[0] == expected
            out = ak.prefix_causal_attention_varlen(q, k, v, cu, 11, 2)
        torch.testing.assert_close(out, ref.prefix_causal_attention_varlen(q, k, v, cu, torch.full((3,), 2)).to(device))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prefix", [None, torch.tensor([1, 0, 9])])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(prefix, causal):
    cu = _cu([3, 0, 4])
    q, k, v = _qkv(7, "cpu", dtype=torch.float64, grad=True)
    fn = lambda a, b, c: ak.prefix_causal_attention_varlen(a, b, c, cu, 4, prefix, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck(impl, device):
    q, k, v = _qkv(12, device, grad=True)
    cu = _cu([5, 0, 7], device)
    torch.library.opcheck(attention_varlen.attention_varlen_op, (q, k, v, cu, 7, torch.tensor([2, 0, 9], device=device), True, 0.25))


def test_torch_compile_fullgraph(impl, device):
    def step(q, k, v, cu, prefix):
        return (ak.prefix_causal_attention_varlen(q, k, v, cu, 11, prefix) ** 2).sum() + \
            ak.prefix_causal_attention_varlen(q, k, v, cu, 11, 3, causal=False).sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    # Same T, other boundaries and prefixes: the op reads them at run time, so no retrace is needed.
    for lengths, prefix in (([4, 0, 11, 5], [1, 0, 20, 4]), ([11, 9, 0, 0], [0, 3, 1, 1])):
        cu = _cu(lengths, device)
        q, k, v = _qkv(20, device, grad=True)
        prefix = torch.tensor(prefix, device=device)
        eager = step(q, k, v, cu, prefix)
        got = compiled(q, k, v, cu, prefix)
        torch.testing.assert_close(got, eager)
        for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(eager, (q, k, v))):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1
    _assert_launched(impl)


def _args(T=10, cu=(0, 3, 10), max_seqlen=7, **changes):
    q, k, v = torch.randn(3, T, H, D).unbind(0)
    args = dict(q=q, k=k, v=v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max_seqlen)
    args.update(changes)
    return args


def _call(**kwargs):
    args = _args(**{k: kwargs.pop(k) for k in ("T", "cu", "max_seqlen") if k in kwargs}, **kwargs)
    pos = [args.pop(name) for name in ("q", "k", "v", "cu_seqlens", "max_seqlen")]
    return ak.prefix_causal_attention_varlen(*pos, **args)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(q=torch.randn(10, H * D)), ValueError, ["q", "3 dimensions"]),
        (dict(k=torch.randn(11, H, D)), ValueError, ["k", "(10, 2, 16)", "(11, 2, 16)"]),
        (dict(v=torch.randn(10, H, 32)), ValueError, ["v", "(10, 2, 32)"]),
        (dict(q=torch.randn(10, D, H).transpose(1, 2)), ValueError, ["q", "contiguous last"]),
        (dict(v=torch.randn(10, H, D, dtype=torch.float64)), TypeError, ["v", "float64"]),
        (dict(k=torch.randn(10, H, D, device="meta")), ValueError, ["k", "meta", "cpu"]),
        (dict(q=torch.randn(10, H, 24), k=torch.randn(10, H, 24), v=torch.randn(10, H, 24)), ValueError, ["head dim", "24"]),
        (dict(cu_seqlens=torch.tensor([0, 3, 10])), TypeError, ["cu_seqlens", "int32", "int64"]),
        (dict(cu_seqlens=[0, 3, 10]), TypeError, ["cu_seqlens", "list"]),
        (dict(cu_seqlens=torch.tensor([[0, 3, 10]], dtype=torch.int32)), ValueError, ["cu_seqlens", "(n + 1,)", "(1, 3)"]),
        (dict(cu_seqlens=torch.zeros(0, dtype=torch.int32)), ValueError, ["cu_seqlens", "(n + 1,)", "(0,)"]),
        (dict(cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32, device="meta")), ValueError, ["cu_seqlens", "meta", "cpu"]),
        (dict(cu=(1, 3, 10)), ValueError, ["cu_seqlens", "start at 0", "1"]),
        (dict(cu=(0, 5, 3, 10)), ValueError, ["cu_seqlens", "non-decreasing", "cu_seqlens[2] = 3", "cu_seqlens[1] = 5"]),
        (dict(cu=(0, 3, 9)), ValueError, ["cu_seqlens", "end at T = 10", "9"]),
        (dict(cu=(0, 3, 11)), ValueError, ["cu_seqlens", "end at T = 10", "11"]),
        (dict(max_seqlen=6), ValueError, ["max_seqlen = 6", "longest", "7"]),
        (dict(max_seqlen=7.0), TypeError, ["max_seqlen", "float"]),
        (dict(max_seqlen=torch.tensor(7)), TypeError, ["max_seqlen", "Tensor"]),
        (dict(max_seqlen=True), TypeError, ["max_seqlen", "bool"]),
        (dict(max_seqlen=-1), ValueError, ["max_seqlen", "-1"]),
        (dict(prefix_len=-1), ValueError, ["prefix_len", "-1"]),
        (dict(prefix_len=torch.tensor([1, -2])), ValueError, ["prefix_len", "-2"]),
        (dict(prefix_len=torch.tensor([1, 2, 3])), ValueError, ["prefix_len", "(2,)", "(3,)"]),
        (dict(prefix_len=torch.tensor([1.0, 2.0])), TypeError, ["prefix_len", "float32"]),
        (dict(prefix_len=2.5), TypeError, ["prefix_len", "float"]),
        (dict(prefix_len=torch.tensor([1, 2], device="meta")), ValueError, ["prefix_len", "meta"]),
        (dict(scale=-1.0), ValueError, ["scale", "-1.0"]),
        (dict(causal=1), TypeError, ["causal", "int"]),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    assert_error_names(lambda: _call(**kwargs), error, words)


@pytest.mark.skipif(not backend.interpreter_enabled(), reason="the GPU runs every candidate in test_attention_candidates.py")
@pytest.mark.parametrize("impl", ["triton"], indirect=True)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq", "bwd"])
def test_first_candidate_of_each_arch_table(impl, device, kernel, arch, monkeypatch):
    """The VARLEN kernels at the config a GPU runs first (the one compile_check checks for varlen),
    D = 128, in fp32 in the interpreter: sequences shorter than, across and longer than one tile."""
    from aimv2_kernels.triton_backend import attention as common

    lengths = CASES["long_among_short"]
    cu, T = _cu(lengths, device), sum(lengths)
    q, k, v = (torch.randn(T, H, 128, device=device, requires_grad=True) for _ in range(3))
    prefix_len = _prefix_for("edges", lengths, device)
    config = common.candidate_configs(kernel, 128, common.TABLE_CAPABILITIES[arch])[0]
    # dkdv and dq are the deterministic backward's kernels, bwd the atomic one's
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if kernel in ("dkdv", "dq") else "0")
    with common.forced_config(kernel, config):
        out = ak.prefix_causal_attention_varlen(q, k, v, cu, max(lengths), prefix_len, causal=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = _dense_oracle(q, k, v, cu, prefix_len, True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-4)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout.double())
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=5e-5, rtol=5e-4, msg=lambda m: f"d{name}: {m}")
    _assert_launched(impl)
