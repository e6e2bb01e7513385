"""The two ways into every op (ops/autograd.py): the eager fast path (a plain autograd.Function) and
the torch.library custom op (torch.compile, export, opcheck, dispatch modes), with one implementation
behind both; and what the fast path no longer pays for: zero gradients for unused outputs, a backend
resolution per call."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels.ops import (attention, attention_qkvpacked, attention_varlen, attention_varlen_qkvpacked, loss, norm,
                               swiglu)


class Recorder(TorchDispatchMode):
    """Records (op name, output shape) of every call it sees; while active, calls take the custom op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def _leaf(*shape, device, grad=True):
    return torch.randn(*shape, device=device).requires_grad_(grad)


def _cases(device):
    """name -> (call, inputs, differentiable leaves, custom op of the forward, fast-path caller)."""
    x, r, w = _leaf(3, 16, device=device), _leaf(3, 16, device=device), _leaf(16, device=device)
    g, u, packed = _leaf(3, 16, device=device), _leaf(3, 16, device=device), _leaf(3, 32, device=device)
    q, k, v = (_leaf(2, 2, 5, 16, device=device) for _ in range(3))
    prefix = torch.tensor([2, 0], device=device)
    tq, tk, tv = (_leaf(7, 2, 16, device=device) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    qkv, tqkv = _leaf(2, 5, 3, 2, 16, device=device), _leaf(7, 3, 2, 16, device=device)
    pred, target = _leaf(2, 3, 8, device=device), _leaf(2, 3, 8, device=device, grad=False)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    hidden, weight, bias = _leaf(5, 16, device=device), _leaf(11, 16, device=device), _leaf(11, device=device)
    labels = torch.tensor([1, -100, 10, 0, 3], device=device)
    return {
        "rms_norm": (lambda a, b: ak.rms_norm(a, b), (x, w), [x, w], norm.rms_norm_op, norm._rms_norm_call),
        "rms_norm_residual": (lambda a, b, c: ak.rms_norm_residual(a, b, c), (x, r, w), [x, r, w],
                              norm.rms_norm_residual_op, norm._rms_norm_residual_call),
        "swiglu": (ak.swiglu, (g, u), [g, u], swiglu.swiglu_op, swiglu._swiglu_call),
        "swiglu_packed": (ak.swiglu_packed, (packed,), [packed], swiglu.swiglu_packed_op, swiglu._swiglu_packed_call),
        "attention": (lambda a, b, c: ak.prefix_causal_attention(a, b, c, prefix), (q, k, v), [q, k, v],
                      attention.attention_op, attention._attention_call),
        "attention_varlen": (lambda a, b, c: ak.prefix_causal_attention_varlen(a, b, c, cu, 4, 2), (tq, tk, tv),
                             [tq, tk, tv], attention_varlen.attention_varlen_op, attention_varlen._attention_varlen_call),
        "attention_qkvpacked": (lambda t: ak.prefix_causal_attention_qkvpacked(t, prefix), (qkv,), [qkv],
                                attention_qkvpacked.qkvpacked_op, attention_qkvpacked._qkvpacked_call),
        "attention_varlen_qkvpacked": (lambda t: ak.prefix_causal_attention_varlen_qkvpacked(t, cu, 4, 2), (tqkv,), [tqkv],
                                       attention_varlen_qkvpacked.varlen_qkvpacked_op,
                                       attention_varlen_qkvpacked._varlen_qkvpacked_call),
        "patch_mse_loss": (lambda p: ak.patch_mse_loss(p, target, mask), (pred,), [pred], loss.patch_mse_op,
                           loss._patch_mse_call),
        "linear_cross_entropy": (lambda h, wt, b: ak.linear_cross_entropy(h, wt, labels, bias=b), (hidden, weight, bias),
                                 [hidden, weight, bias], loss.linear_ce_op, loss._linear_ce_call),
    }


def _backends():
    return ["torch"] + (["triton"] if ak.unavailable_reason("triton") is None else [])


def _forward_backward(call, inputs, leaves):
    out = call(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    return outs, grads


@pytest.mark.parametrize("backend_name", _backends())
@pytest.mark.parametrize("name", list(_cases("cpu")))
def test_both_paths_run_the_same_implementation(device, backend_name, name):
    call, inputs, leaves, op, caller = _cases(device)[name]
    with ak.use_backend(backend_name):
        fast = call(*inputs)
        first = fast[0] if isinstance(fast, tuple) else fast
        assert getattr(first.grad_fn, "_forward_cls", None) is caller.function, first.grad_fn  # the fast path
        fast_outs, fast_grads = _forward_backward(call, inputs, leaves)

        with Recorder() as seen:  # a dispatch mode: the custom op path, our op seen as one call
            out = call(*inputs)
        assert any(c[0] == str(op._opoverload) for c in seen.calls), seen.calls
        first = out[0] if isinstance(out, tuple) else out
        assert getattr(first.grad_fn, "_forward_cls", None) is not caller.function
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    for a, b in zip(outs + list(grads), fast_outs + list(fast_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_calls_skip_autograd(device):
    x, w = _leaf(3, 16, device=device), _leaf(16, device=device)
    with torch.no_grad():
        y = ak.rms_norm(x, w)
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, ak.reference.rms_norm(x, w).detach())


def test_torch_compile_traces_the_custom_ops_not_the_fast_path(device):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    x, w = _leaf(3, 16, device=device), _leaf(16, device=device)
    g, u = _leaf(3, 16, device=device), _leaf(3, 16, device=device)
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c, d: ak.rms_norm(a, b).sum() + ak.swiglu(c, d).sum(), fullgraph=True, backend=record)
    fn(x, w, g, u).backward()
    assert len(graphs) == 1
    assert "aimv2_kernels.rms_norm" in graphs[0] and "aimv2_kernels.swiglu" in graphs[0], graphs[0]
    assert x.grad is not None and g.grad is not None


def _zeros_made(calls):
    return [c for c in calls if "zero" in c[0] or "fill" in c[0]]


@pytest.mark.parametrize("path", ["fast", "custom op"])
def test_no_zero_gradients_are_made_for_unused_outputs(device, path):
    """rstd, lse, an unused residual stream and the linear cross-entropy's gradient outputs ((T, D),
    (V, D), (V,)) have no gradient: the backward gets None, not a zero tensor of their shape."""
    hidden, weight = _leaf(6, 16, device=device), _leaf(40, 16, device=device)
    labels = torch.randint(0, 40, (6,), device=device)
    x, r, w = _leaf(3, 16, device=device), _leaf(3, 16, device=device), _leaf(16, device=device)
    q, k, v = (_leaf(1, 2, 4, 16, device=device) for _ in range(3))
    outputs = []
    with ak.use_backend("torch"), (Recorder() if path == "custom op" else torch.enable_grad()):
        outputs.append(ak.linear_cross_entropy(hidden, weight, labels))
        outputs.append(ak.rms_norm(x, w).sum())
        outputs.append(ak.rms_norm_residual(x, r, w)[0].sum())  # the stream unused
        outputs.append(ak.rms_norm_residual(x, r, w)[1].sum())  # y unused
        outputs.append(ak.prefix_causal_attention(q, k, v).sum())
    for out in outputs:
        with Recorder() as seen:
            out.backward()
        assert not _zeros_made(seen.calls), seen.calls
    assert weight.grad.shape == (40, 16) and x.grad is not None and q.grad is not None


def test_resolution_is_cached_and_a_new_registration_is_seen(device):
    kernel = "_eager_path_test_kernel"
    name = "cuda" if device.type == "cuda" else "triton"
    if ak.unavailable_reason(name) is not None:
        pytest.skip(ak.unavailable_reason(name))
    backend.register(kernel, "torch")(lambda: "torch")
    try:
        with ak.use_backend(name):
            assert backend.resolve(kernel, device)[0] == "torch"  # no implementation of `name` yet
            assert backend.resolve(kernel, device)[0] == "torch"  # now from the cache
            backend.register(kernel, name)(lambda: name)
            assert backend.resolve(kernel, device)[0] == name
    finally:
        backend._REGISTRY.pop(kernel)
        backend._resolved.clear()
