"""The custom-op layer on the "torch" backend: autograd, opcheck, torch.compile, edge cases.

The float64 gradchecks (`test_gradcheck_*`) run on CPU tensors on every machine, GPU or not: they
check the ops' autograd wiring on the float64 reference, which is the same code on every device, and
they run single-threaded (tiny tensors; with OpenMP threads competing for cores, as under pytest-xdist
on a busy machine, one gradcheck took 10 to 40 s instead of about 1 s). Every other test runs on the
`device` fixture's device, so on a GPU machine opcheck, torch.compile and the edge cases also see CUDA
tensors.
"""
import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import reference as ref
from aimv2_kernels.ops import attention, loss, norm, swiglu

f64 = dict(dtype=torch.float64, device="cpu")  # gradcheck: float64 on the CPU reference, everywhere


def _randn(*shape, grad=True):
    return torch.randn(*shape, **f64).requires_grad_(grad)


@pytest.fixture(autouse=True)
def _torch_backend():
    with ak.use_backend("torch"):
        yield


@pytest.mark.usefixtures("one_thread")
def test_gradcheck_rms_norm_ops():
    x, w = _randn(2, 3, 7), _randn(7)
    assert torch.autograd.gradcheck(lambda a, b: ak.rms_norm(a, b), (x, w))
    assert torch.autograd.gradcheck(lambda a: ak.rms_norm(a, None), (x,))
    r = _randn(2, 3, 7)
    assert torch.autograd.gradcheck(lambda a, b, c: ak.rms_norm_residual(a, b, c), (x, r, w))


@pytest.mark.usefixtures("one_thread")
def test_gradcheck_swiglu_ops():
    g, u = _randn(3, 5), _randn(3, 5)
    assert torch.autograd.gradcheck(ak.swiglu, (g, u))
    assert torch.autograd.gradcheck(ak.swiglu_packed, (_randn(2, 2, 6),))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prefix", [None, 0, 3, torch.tensor([1, 9])])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_attention_op(prefix, causal):
    q, k, v = _randn(2, 2, 6, 16), _randn(2, 2, 6, 16), _randn(2, 2, 6, 16)
    fn = lambda a, b, c: ak.prefix_causal_attention(a, b, c, prefix, causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    expected = ref.prefix_causal_attention(q, k, v, attention._prefix_tensor(prefix, 2, q.device) if causal else None, causal)
    torch.testing.assert_close(fn(q, k, v), expected)


@pytest.mark.usefixtures("one_thread")
def test_gradcheck_loss_ops():
    pred, target = _randn(2, 4, 5), _randn(2, 4, 5, grad=False)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    assert torch.autograd.gradcheck(lambda p: ak.patch_mse_loss(p, target, mask), (pred,))
    assert torch.autograd.gradcheck(lambda p: ak.patch_mse_loss(p, target, None, norm_pix=False), (pred,))
    h, w, b = _randn(2, 3, 4), _randn(7, 4), _randn(7)
    labels = torch.tensor([[1, -100, 6], [0, 3, 3]])
    assert torch.autograd.gradcheck(lambda x, y, z: ak.linear_cross_entropy(x, y, labels, bias=z), (h, w, b))
    assert torch.autograd.gradcheck(
        lambda p, x, y: ak.aimv2_loss(p, target, mask, x, y, labels).total, (pred, h, w)
    )


def test_aimv2_loss_parts(device):
    pred, target = torch.randn(2, 4, 5, device=device), torch.randn(2, 4, 5, device=device)
    mask = torch.rand(2, 4, device=device) > 0.3
    hidden, weight = torch.randn(2, 3, 4, device=device), torch.randn(7, 4, device=device)
    labels = torch.randint(0, 7, (2, 3), device=device)
    out = ak.aimv2_loss(pred, target, mask, hidden, weight, labels, alpha=0.4)
    assert isinstance(out, ak.AIMv2Loss)
    torch.testing.assert_close(out.pixel, ref.patch_mse_loss(pred, target, mask))
    torch.testing.assert_close(out.text, ref.linear_cross_entropy(hidden, weight, labels))
    torch.testing.assert_close(out.total, 0.4 * out.pixel + out.text)


def test_nothing_counted_gives_zero_loss_and_zero_gradients(device):
    pred = torch.randn(2, 3, 4, device=device, requires_grad=True)
    hidden = torch.randn(2, 3, 4, device=device, requires_grad=True)
    weight = torch.randn(5, 4, device=device, requires_grad=True)
    labels = torch.full((2, 3), -100, device=device)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=device)
    out = ak.aimv2_loss(pred, torch.randn(2, 3, 4, device=device), mask, hidden, weight, labels)
    assert out.total.item() == 0.0 and out.pixel.item() == 0.0 and out.text.item() == 0.0
    out.total.backward()
    for t in (pred, hidden, weight):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max().item() == 0.0


def _sample_args(device="cpu"):
    def randn(*shape):
        return torch.randn(*shape, device=device)

    def tensor(values, **kwargs):
        return torch.tensor(values, device=device, **kwargs)

    return {
        norm.rms_norm_op: (randn(3, 5), randn(5), 1e-5),
        norm.rms_norm_residual_op: (randn(3, 5), randn(3, 5), randn(5), 1e-5),
        swiglu.swiglu_op: (randn(3, 5), randn(3, 5)),
        swiglu.swiglu_packed_op: (randn(3, 6),),
        attention.attention_op: (*randn(3, 2, 2, 5, 16).unbind(0), tensor([2, 0], dtype=torch.int32), True, 0.25),
        loss.patch_mse_op: (randn(2, 3, 5), randn(2, 3, 5), torch.rand(2, 3, device=device) > 0.5, True, 1e-6),
        loss.linear_ce_op: (randn(4, 3), randn(6, 3), tensor([1, -100, 5, 0]), randn(6), -100, True, True),
    }


@pytest.mark.parametrize("op", list(_sample_args()), ids=lambda op: op._name if hasattr(op, "_name") else str(op))
def test_opcheck(device, op):
    args = _sample_args(device)[op]
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_through_every_op(device):
    def step(x, w, r, g, u, packed, q, k, v, prefix, pred, target, mask, hidden, weight, labels):
        y = ak.rms_norm(x, w)
        y2, stream = ak.rms_norm_residual(x, r, w)
        s = ak.swiglu(g, u) + ak.swiglu_packed(packed)
        o = ak.prefix_causal_attention(q, k, v, prefix)
        losses = ak.aimv2_loss(pred, target, mask, hidden, weight, labels)
        return y.sum() + y2.sum() + stream.sum() + s.sum() + o.sum() + losses.total

    args = [
        torch.randn(3, 8), torch.randn(8), torch.randn(3, 8), torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 12),
        *torch.randn(3, 2, 2, 5, 16).unbind(0), torch.tensor([3, 1]), torch.randn(2, 3, 5), torch.randn(2, 3, 5),
        torch.rand(2, 3) > 0.4, torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3)),
    ]
    args = [a.to(device) for a in args]
    for i in (0, 1, 3, 4, 6, 7, 8, 10, 13, 14):
        args[i].requires_grad_()
    eager = step(*args)
    eager_grads = torch.autograd.grad(eager, [args[i] for i in (0, 1, 3, 4, 6, 7, 8, 10, 13, 14)])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled, [args[i] for i in (0, 1, 3, 4, 6, 7, 8, 10, 13, 14)])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_attention_output_is_a_bshd_view(device):
    q, k, v = torch.randn(3, 2, 4, 5, 32, device=device).unbind(0)
    out = ak.prefix_causal_attention(q, k, v, 2)
    assert out.shape == (2, 4, 5, 32)
    assert out.transpose(1, 2).is_contiguous()  # (B, S, H, D) memory: the reshape to (B, S, H*D) is free
