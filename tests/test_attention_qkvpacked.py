"""ak.prefix_causal_attention_qkvpacked: the packed (B, S, 3, H, D) projection output in, (B, S, H, D)
out, and d qkv written in the packed layout by the backward (no stack of three gradients).

Runs on the `device` fixture's device, on the "torch" backend and the "triton" one (Triton's
interpreter on CPU tensors, the compiled kernels on CUDA ones), against the float64 reference of the
unpacked op.
"""
import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels import reference as ref
from aimv2_kernels.triton_backend.common import poisoned_outputs
from tests.helpers import TOLERANCE, assert_close

B, H, D = 2, 3, 16


@pytest.fixture(params=["torch", "triton"])
def on_backend(request, monkeypatch):
    """Runs the test on one backend and counts its attention calls, so the reference cannot stand in."""
    name = request.param
    calls = {"attention_fwd": 0, "attention_bwd": 0}
    with ak.use_backend(name), poisoned_outputs():
        assert backend.unavailable_reason(name) is None
        for kernel in calls:
            impl = backend._REGISTRY[kernel][name]

            def counted(*args, _impl=impl, _kernel=kernel):
                calls[_kernel] += 1
                return _impl(*args)

            monkeypatch.setitem(backend._REGISTRY[kernel], name, counted)
        yield name, calls


def _qkv(S, device, dtype, strided):
    """(B, S, 3, H, D) random; strided: a view with every stride but the last changed (a slice of a
    wider buffer along heads and a step over positions)."""
    if strided:
        return torch.randn(B, 2 * S, 3, H + 2, D, device=device, dtype=dtype)[:, ::2, :, 1:H + 1]
    return torch.randn(B, S, 3, H, D, device=device, dtype=dtype)


def _expected(qkv, prefix, causal, dout):
    packed = qkv.detach().double().requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    prefix_t = prefix if prefix is None or isinstance(prefix, torch.Tensor) else torch.full((B,), prefix)
    out = ref.prefix_causal_attention(q, k, v, None if not causal else prefix_t, causal).transpose(1, 2)
    (grad,) = torch.autograd.grad(out, packed, dout.double())
    return out, grad


@pytest.mark.parametrize("S", [1, 37, 70])
@pytest.mark.parametrize("prefix,causal", [(None, True), (5, True), ("tensor", True), ("strided", True), (None, False)])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_reference_forward_and_backward(on_backend, device, S, prefix, causal, strided):
    name, calls = on_backend
    dtype = torch.float64 if name == "torch" else torch.float32
    if prefix == "tensor":
        prefix = torch.randint(0, S + 3, (B,), device=device)
    elif prefix == "strided":
        prefix = torch.randint(0, S + 3, (2 * B,), device=device, dtype=torch.int32)[::2]
    qkv = _qkv(S, device, dtype, strided).requires_grad_()
    out = ak.prefix_causal_attention_qkvpacked(qkv, prefix, causal=causal)
    dout = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    want_out, want_grad = _expected(qkv, prefix if causal else None, causal, dout)
    tol = TOLERANCE[dtype] if dtype == torch.float64 else 2e-5  # fp32: the kernels keep tf32 off by default
    assert out.shape == (B, S, H, D) and out.is_contiguous()
    assert_close(out, want_out, tol, "out")
    assert grad.shape == qkv.shape and grad.is_contiguous()  # the packed layout, written once
    assert_close(grad, want_grad, tol, "d qkv")
    assert calls == {"attention_fwd": 1, "attention_bwd": 1}


def test_backward_stacks_nothing(device):
    """The module's pattern (a Linear's output viewed as (B, S, 3, H, D)): autograd's backward of the
    attention and the view runs no stack or cat of the three gradients."""
    x = torch.randn(B, 9, 3 * H * D, device=device, requires_grad=True)
    out = ak.prefix_causal_attention_qkvpacked(x.view(B, 9, 3, H, D), 2)
    dout = torch.randn_like(out)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(dout)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::stack", "aten::cat"}, sorted(names)
    # the unpacked op, for contrast: unbinding qkv makes autograd stack the three gradients
    qkv = x.detach().view(B, 9, 3, H, D).requires_grad_()
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ak.prefix_causal_attention(q, k, v, 2).backward(dout.transpose(1, 2))
    assert "aten::stack" in {e.name for e in prof.events()}


def test_gradcheck_float64_reference(one_thread):
    qkv = torch.randn(2, 5, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    with ak.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: ak.prefix_causal_attention_qkvpacked(t, torch.tensor([1, 3])), (qkv,))


def test_opcheck_and_compile(device):
    qkv = torch.randn(2, 7, 3, 2, 16, device=device, requires_grad=True)
    prefix = torch.tensor([2, 5], device=device)
    ops = torch.ops.aimv2_kernels
    torch.library.opcheck(ops.prefix_causal_attention_qkvpacked, (qkv, prefix, True, 0.25))
    out, lse = ops.prefix_causal_attention_qkvpacked(qkv, prefix, True, 0.25)
    torch.library.opcheck(ops.prefix_causal_attention_qkvpacked_backward,
                          (torch.randn_like(out), qkv.detach(), out.detach(), lse.detach(), prefix, True, 0.25))
    compiled = torch.compile(lambda t: ak.prefix_causal_attention_qkvpacked(t, prefix), fullgraph=True, backend="eager")
    assert_close(compiled(qkv), ak.prefix_causal_attention_qkvpacked(qkv, prefix), 1e-6, "compiled out")


@pytest.mark.parametrize("qkv,match", [
    (torch.randn(2, 5, 2, 16), "qkv must have 5 dim"),
    (torch.randn(2, 5, 4, 2, 16), r"qkv must have shape \(B, S, 3, H, D\)"),
    (torch.randn(2, 5, 3, 2, 16).transpose(-1, -2).contiguous().transpose(-1, -2), "qkv must have a contiguous last"),
    (torch.randn(2, 5, 3, 2, 8), "qkv has head dim 8"),
    (torch.randint(0, 3, (2, 5, 3, 2, 16)), "qkv"),
    (torch.randn(2, 0, 3, 2, 16), "at least one position"),
])
def test_bad_input_is_named(qkv, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ak.prefix_causal_attention_qkvpacked(qkv)


def test_bad_prefix_is_named():
    with pytest.raises(ValueError, match="prefix_len"):
        ak.prefix_causal_attention_qkvpacked(torch.randn(2, 5, 3, 2, 16), torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("prefix,causal", [(None, True), (None, False), (3, True)])
def test_module_runs_sdpa_without_a_prefix_and_ours_with_one(monkeypatch, prefix, causal):
    """ak.nn.PrefixCausalSelfAttention: plain causal or bidirectional calls (no prefix) go to PyTorch's
    SDPA, which computes them exactly; a prefix takes our packed op. Either way it equals the
    float64 reference."""
    sdpa_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(kw) or sdpa(*a, **kw))
    module = ak.nn.PrefixCausalSelfAttention(48, 3).double()
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    with ak.use_backend("torch"):
        out = module(x, prefix, causal=causal)
    qkv = module.qkv(x).view(2, 11, 3, 3, 16)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    prefix_t = None if prefix is None else torch.full((2,), prefix)
    want = module.proj(ref.prefix_causal_attention(q, k, v, prefix_t, causal).transpose(1, 2).reshape(2, 11, 48))
    assert_close(out, want, 1e-10, "module out")
    assert sdpa_calls == ([] if prefix is not None else [{"is_causal": causal}])
