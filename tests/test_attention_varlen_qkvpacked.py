"""ak.prefix_causal_attention_varlen_qkvpacked: packed sequences as one projection's (T, 3, H, D)
output in, (T, H, D) out, and d qkv written in the packed layout by the backward (no stack of three
gradients).

The correctness tests run on the "torch" backend and the "triton" one in both backward designs
(Triton's interpreter on CPU tensors, the compiled kernels on CUDA ones), with poisoned outputs and a
count of the registry calls, so a silent fallback to the reference fails; they compare against the
float64 reference of the unpacked varlen op. The float64 gradcheck runs on CPU tensors.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.triton_backend.common import poisoned_outputs
from tests.helpers import assert_close, assert_error_names

H, D = 2, 16
VARLEN_KERNELS = ("attention_varlen_fwd", "attention_varlen_bwd")
LENGTHS = {
    "mixed": [17, 0, 33, 5, 1, 40],  # an empty sequence, lengths across, below and above one 16-row tile
    "random": [0, *(int(n) for n in torch.randint(1, 40, (4,), generator=torch.Generator().manual_seed(3)))],
}


@pytest.fixture(params=["torch", "triton", "triton-deterministic"])
def impl(request, monkeypatch):
    """Run the test under this backend, with poisoned outputs and counting the calls of its varlen
    implementations (yields {kernel: calls}). "triton" runs the default backward (dQ by atomics),
    "triton-deterministic" the deterministic one."""
    name = "torch" if request.param == "torch" else "triton"
    if backend.unavailable_reason(name) is not None:  # also imports the triton kernel modules
        pytest.skip(backend.unavailable_reason(name))
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1" if request.param == "triton-deterministic" else "0")
    calls = dict.fromkeys(VARLEN_KERNELS, 0)
    with ak.use_backend(name), poisoned_outputs():
        for kernel in VARLEN_KERNELS:
            def counted(*args, _impl=backend._REGISTRY[kernel][name], _kernel=kernel):
                calls[_kernel] += 1
                return _impl(*args)

            monkeypatch.setitem(backend._REGISTRY[kernel], name, counted)
        yield calls


def _cu(lengths, device):
    """(n + 1,) int32 boundaries of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _qkv(T, device, strided, dtype=torch.float32):
    """(T, 3, H, D) random; strided: a view with every stride but the last changed (a slice of a wider
    buffer along heads and a step over tokens)."""
    if strided:
        return torch.randn(2 * T, 3, H + 2, D, device=device, dtype=dtype)[::2, :, 1:H + 1]
    return torch.randn(T, 3, H, D, device=device, dtype=dtype)


def _expected(qkv, cu, prefix, causal, dout):
    """float64 reference of the unpacked op on qkv's three views: (out (T, H, D), d qkv (T, 3, H, D))."""
    packed = qkv.detach().double().requires_grad_()
    out = ref.prefix_causal_attention_varlen(*packed.unbind(1), cu, prefix, causal)
    (grad,) = torch.autograd.grad(out, packed, dout.double())
    return out, grad


@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("prefix,causal", [(None, True), (5, True), ("tensor", True), ("strided", True), (None, False)])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference_forward_and_backward(impl, device, case, prefix, causal, strided):
    lengths = LENGTHS[case]
    n, T, longest = len(lengths), sum(lengths), max(lengths)
    cu = _cu(lengths, device)
    if prefix == "tensor":
        prefix = torch.randint(0, longest + 3, (n,), device=device)
    elif prefix == "strided":
        prefix = torch.randint(0, longest + 3, (2 * n,), device=device, dtype=torch.int32)[::2]
    qkv = _qkv(T, device, strided).requires_grad_()
    out = ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu, longest, prefix, causal=causal)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    prefix_t = torch.full((n,), prefix, device=device) if isinstance(prefix, int) else prefix
    want_out, want_grad = _expected(qkv, cu, prefix_t, causal, dout)
    assert out.shape == (T, H, D) and out.is_contiguous()
    assert_close(out, want_out, 2e-5, "out")  # fp32: the kernels keep tf32 off by default
    assert grad.shape == (T, 3, H, D) and grad.is_contiguous()  # the packed layout, written once
    assert_close(grad, want_grad, 2e-5, "d qkv")
    assert impl == {"attention_varlen_fwd": 1, "attention_varlen_bwd": 1}


@pytest.mark.filterwarnings("ignore:aimv2_kernels. Triton attention does not support")
@pytest.mark.parametrize("name,dtype", [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float64)],
                         ids=["torch", "triton", "triton-fallback"])
def test_backward_kernel_writes_into_the_given_views(device, name, dtype):
    """The registry kernel "attention_varlen_bwd" with `grads`: it fills the three given views of one
    NaN-filled (T, 3, H, D) buffer and returns them. float64 on "triton" is its fallback to the
    "torch" kernel, which must carry `grads` along."""
    if backend.unavailable_reason(name) is not None:
        pytest.skip(backend.unavailable_reason(name))
    lengths = LENGTHS["mixed"]
    cu, T = _cu(lengths, device), sum(lengths)
    prefix = torch.tensor([3, 0, 40, 2, 1, 7], device=device)
    qkv = _qkv(T, device, strided=True, dtype=dtype)
    q, k, v = qkv.unbind(1)
    with ak.use_backend(name):
        out, lse = backend.resolve("attention_varlen_fwd", qkv.device, q)[1](q, k, v, cu, 40, prefix, True, 0.25)
        dout = torch.randn_like(out)
        dqkv = torch.full((T, 3, H, D), float("nan"), device=device, dtype=dtype)
        views = dqkv.unbind(1)
        returned = backend.resolve("attention_varlen_bwd", qkv.device, q)[1](dout, q, k, v, out, lse, cu, 40, prefix,
                                                                              True, 0.25, views)
    assert all(r is view for r, view in zip(returned, views))
    packed = qkv.double().requires_grad_()
    want = ref.prefix_causal_attention_varlen(*packed.unbind(1), cu, prefix, True, 0.25)
    (want_grad,) = torch.autograd.grad(want, packed, dout.double())
    assert_close(dqkv, want_grad, 2e-5, "d qkv")


def test_all_sequences_empty(impl, device):
    qkv = torch.randn(0, 3, H, D, device=device, requires_grad=True)
    out = ak.prefix_causal_attention_varlen_qkvpacked(qkv, _cu([0, 0], device), 0, 1)
    assert out.shape == (0, H, D)
    out.sum().backward()
    assert qkv.grad.shape == (0, 3, H, D)
    assert impl == {"attention_varlen_fwd": 1, "attention_varlen_bwd": 1}


def test_backward_stacks_nothing(impl, device):
    """The module's packed path (a Linear's output viewed as (T, 3, H, D)): autograd's backward of the
    attention and the view runs no stack or cat of the three gradients."""
    lengths = [9, 0, 14]
    cu, T = _cu(lengths, device), sum(lengths)
    module = ak.nn.PrefixCausalSelfAttention(H * D, H).to(device)
    x = torch.randn(T, H * D, device=device, requires_grad=True)
    out = module(x, torch.tensor([2, 0, 5], device=device), cu_seqlens=cu, max_seqlen=14)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    names = {e.name for e in prof.events()}
    assert not names & {"aten::stack", "aten::cat"}, sorted(names)
    assert impl == {"attention_varlen_fwd": 1, "attention_varlen_bwd": 1}
    # the unpacked op, for contrast: unbinding qkv makes autograd stack the three gradients
    qkv = module.qkv(x).detach().view(T, 3, H, D).requires_grad_()
    unpacked = ak.prefix_causal_attention_varlen(*qkv.unbind(1), cu, 14, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        unpacked.sum().backward()
    assert "aten::stack" in {e.name for e in prof.events()}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prefix", [None, torch.tensor([1, 0, 9])])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64_torch_backend(prefix, causal):
    cu = _cu([3, 0, 4], "cpu")
    qkv = torch.randn(7, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    with ak.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda t: ak.prefix_causal_attention_varlen_qkvpacked(t, cu, 4, prefix, causal=causal), (qkv,))


def test_opcheck(impl, device):
    qkv = torch.randn(12, 3, H, D, device=device, requires_grad=True)
    cu = _cu([5, 0, 7], device)
    prefix = torch.tensor([2, 0, 9], device=device)
    ops = torch.ops.aimv2_kernels
    torch.library.opcheck(ops.prefix_causal_attention_varlen_qkvpacked, (qkv, cu, 7, prefix, True, 0.25))
    out, lse = ops.prefix_causal_attention_varlen_qkvpacked(qkv, cu, 7, prefix, True, 0.25)
    torch.library.opcheck(ops.prefix_causal_attention_varlen_qkvpacked_backward,
                          (torch.randn_like(out), qkv.detach(), out.detach(), lse.detach(), cu, 7, prefix, True, 0.25))


def test_torch_compile_fullgraph(impl, device):
    def step(qkv, cu, prefix):
        return (ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu, 11, prefix) ** 2).sum() + \
            ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu, 11, 3, causal=False).sum()

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    # Same T, other boundaries and prefixes: the op reads them at run time, so no retrace is needed.
    for lengths, prefix in (([4, 0, 11, 5], [1, 0, 20, 4]), ([11, 9, 0, 0], [0, 3, 1, 1])):
        cu = _cu(lengths, device)
        qkv = torch.randn(20, 3, H, D, device=device, requires_grad=True)
        prefix = torch.tensor(prefix, device=device)
        eager = step(qkv, cu, prefix)
        got = compiled(qkv, cu, prefix)
        torch.testing.assert_close(got, eager)
        (want,), (grad,) = torch.autograd.grad(eager, qkv), torch.autograd.grad(got, qkv)
        torch.testing.assert_close(grad, want)
    assert counter.frame_count == 1
    assert impl["attention_varlen_fwd"] >= 1 and impl["attention_varlen_bwd"] >= 1


def _call(qkv=None, cu=(0, 3, 10), max_seqlen=7, **kwargs):
    qkv = torch.randn(10, 3, H, D) if qkv is None else qkv
    cu_seqlens = torch.tensor(cu, dtype=torch.int32) if isinstance(cu, tuple) else cu
    return ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(qkv=torch.randn(10, 3 * H, D)), ValueError, ["qkv", "4 dimensions"]),
        (dict(qkv=torch.randn(10, 4, H, D)), ValueError, ["qkv", "(T, 3, H, D)", "(10, 4, 2, 16)"]),
        (dict(qkv=torch.randn(10, 3, D, H).transpose(-1, -2)), ValueError, ["qkv", "contiguous last"]),
        (dict(qkv=torch.randn(10, 3, H, 24)), ValueError, ["qkv", "head dim 24"]),
        (dict(qkv=torch.randint(0, 3, (10, 3, H, D))), TypeError, ["qkv", "int64"]),
        (dict(qkv=[1.0]), TypeError, ["qkv", "list"]),
        (dict(cu=torch.tensor([0, 3, 10])), TypeError, ["cu_seqlens", "int32", "int64"]),
        (dict(cu=torch.tensor([0, 3, 10], dtype=torch.int32, device="meta")), ValueError,
         ["cu_seqlens", "meta", "qkv"]),
        (dict(cu=(0, 5, 3, 10)), ValueError, ["cu_seqlens", "non-decreasing"]),
        (dict(cu=(0, 3, 9)), ValueError, ["cu_seqlens", "end at T = 10", "9"]),
        (dict(max_seqlen=6), ValueError, ["max_seqlen = 6", "longest", "7"]),
        (dict(max_seqlen=7.0), TypeError, ["max_seqlen", "float"]),
        (dict(prefix_len=torch.tensor([1, 2, 3])), ValueError, ["prefix_len", "(2,)", "(3,)"]),
        (dict(prefix_len=torch.tensor([1, -2])), ValueError, ["prefix_len", "-2"]),
        (dict(prefix_len=torch.tensor([1, 2], device="meta")), ValueError, ["prefix_len", "meta", "qkv"]),
        (dict(scale=-1.0), ValueError, ["scale", "-1.0"]),
        (dict(causal=1), TypeError, ["causal", "int"]),
    ],
)
def test_bad_input_is_named(kwargs, error, words):
    assert_error_names(lambda: _call(**kwargs), error, words)
