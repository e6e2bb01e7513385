"""SwiGLU Triton kernels (separate and packed) against the float64 reference. Every test runs on the
`device` fixture's device: CPU tensors through Triton's interpreter without a GPU, CUDA tensors and the
compiled kernels with one; `gpu`-marked tests add bf16 at real sizes. A launch spy proves the kernels
ran."""
import pytest
import torch
import torch.nn.functional as F

import aimv2_kernels as ak
from aimv2_kernels import reference as ref
from aimv2_kernels.backend import resolve
from aimv2_kernels.triton_backend import swiglu as kernels
from helpers import TOLERANCE, assert_close, rel_err
from test_rms_norm_triton import spy_launches, triton_backend  # noqa: F401 (autouse fixture)

HIDDEN = (1, 17, 127, 1000, 2816)
LEADING = ((3,), (2, 5), (2, 3, 4))


@pytest.fixture
def launches(monkeypatch):
    return spy_launches(monkeypatch, kernels, ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"))


def _forward_backward(op, inputs, dout, cast=None):
    """op(*inputs) and the grads of every input for the output grad dout (inputs cast first if asked)."""
    leaves = [(t.to(cast) if cast else t).detach().requires_grad_() for t in inputs]
    out = op(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_against_reference(public_op, reference_op, inputs):
    """Output and grads vs float64; bound: the dtype's tolerance, or twice PyTorch's own error at the
    same precision when that is larger."""
    n_cols = public_op(*inputs).shape
    dout = torch.randn(n_cols, device=inputs[0].device).to(inputs[0].dtype)
    got = _forward_backward(public_op, inputs, dout)
    expected = _forward_backward(reference_op, inputs, dout, cast=torch.float64)
    with ak.use_backend("torch"):
        same_precision = _forward_backward(public_op, inputs, dout)
    for i, (g, e, p) in enumerate(zip(got, expected, same_precision)):
        assert g.dtype == p.dtype and g.shape == p.shape, f"output {i}: {g.dtype} {g.shape} vs {p.dtype} {p.shape}"
        assert_close(g, e, max(TOLERANCE[g.dtype], 2 * rel_err(p, e)), f"output {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_swiglu_matches_reference(launches, device, hidden, leading, dtype):
    gate, up = (torch.randn(*leading, hidden, device=device).to(dtype) for _ in range(2))
    _check_against_reference(ak.swiglu, ref.swiglu, (gate, up))
    assert launches["_swiglu_fwd_kernel"] and launches["_swiglu_bwd_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_swiglu_packed_matches_reference(launches, device, hidden, leading, dtype):
    x = torch.randn(*leading, 2 * hidden, device=device).to(dtype)
    _check_against_reference(ak.swiglu_packed, ref.swiglu_packed, (x,))
    assert launches["_swiglu_fwd_kernel"] and launches["_swiglu_bwd_kernel"]


def _data_ptr_offset(a, b):
    return (a.data_ptr() - b.data_ptr()) // b.element_size()


def test_packed_halves_are_views_of_one_tensor(launches, device):
    """Forward reads both halves of x in place; backward writes both halves of one dx."""
    hidden = 24
    x = torch.randn(3, 5, 2 * hidden + 6, device=device)[:, 1:, : 2 * hidden]  # strided rows as well
    _check_against_reference(ak.swiglu_packed, ref.swiglu_packed, (x,))
    gate_arg, up_arg = launches["_swiglu_fwd_kernel"][0][0][:2]
    assert gate_arg.data_ptr() == x.data_ptr() and _data_ptr_offset(up_arg, x) == hidden
    dgate_arg, dup_arg, = launches["_swiglu_bwd_kernel"][0][0][3:5]
    assert _data_ptr_offset(dup_arg, dgate_arg) == hidden and dgate_arg.stride()[-2] == 2 * hidden


@pytest.mark.parametrize("view", ["drop_last_position", "slice_hidden", "permuted_3_levels"])
def test_strided_rows_are_read_in_place(launches, device, view):
    hidden = 40
    if view == "drop_last_position":
        gate = torch.randn(3, 7, hidden, device=device)[:, :-1]
    elif view == "slice_hidden":
        gate = torch.randn(4, 5, hidden + 5, device=device)[..., :hidden]
    else:
        gate = torch.randn(3, 2, 4, hidden, device=device).permute(1, 0, 2, 3)
    up = torch.randn(gate.shape, device=device).transpose(0, 1).contiguous().transpose(0, 1)  # other strides than gate
    _check_against_reference(ak.swiglu, ref.swiglu, (gate, up))
    args = launches["_swiglu_fwd_kernel"][0][0]
    assert args[0].data_ptr() == gate.data_ptr() and args[0].stride() == gate.stride()
    assert args[1].data_ptr() == up.data_ptr() and args[1].stride() == up.stride()


def test_any_hidden_size_runs_the_kernel(launches, device):
    """Elementwise tiles have no width limit: 20000 columns need no fallback."""
    gate, up = torch.randn(2, 20000, device=device), torch.randn(2, 20000, device=device)
    _check_against_reference(ak.swiglu, ref.swiglu, (gate, up))
    assert launches["_swiglu_fwd_kernel"]


def test_float64_and_empty_inputs(launches, device):
    g, u = (torch.randn(3, 10, dtype=torch.float64, device=device) for _ in range(2))
    assert_close(ak.swiglu(g, u), ref.swiglu(g, u), TOLERANCE[torch.float64], "float64")
    assert not launches["_swiglu_fwd_kernel"]
    empty = torch.randn(0, 4, 16, device=device, requires_grad=True)
    out = ak.swiglu_packed(empty)
    assert out.shape == (0, 4, 8)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_resolves_to_the_triton_implementations(device):
    for name in ("swiglu_fwd", "swiglu_bwd", "swiglu_packed_fwd", "swiglu_packed_bwd"):
        assert resolve(name, device) == ("triton", getattr(kernels, name))


def test_module_keys_and_output(launches, device):
    mlp = ak.nn.SwiGLU(32, 88).to(device)
    assert list(mlp.state_dict()) == ["fc1.weight", "fc3.weight", "fc2.weight"]
    x = torch.randn(2, 5, 32, device=device)
    eager = mlp.fc2(F.silu(mlp.fc1(x)) * mlp.fc3(x))
    assert_close(mlp(x), eager, 3e-5, "module")
    assert launches["_swiglu_fwd_kernel"]


def test_module_gradients_equal_the_two_linear_mlp(device):
    """fc1 and fc3 as one GEMM: output and every gradient (x, fc1, fc3, fc2, biases) as the
    unfused fc2(silu(fc1(x)) * fc3(x)), in float64."""
    mlp = ak.nn.SwiGLU(12, 20, bias=True).to(device, torch.float64)
    x = torch.randn(3, 7, 12, device=device, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(3, 7, 12, device=device, dtype=torch.float64)
    ours = torch.autograd.grad(mlp(x), [x, *mlp.parameters()], dout)
    unfused = torch.autograd.grad(mlp.fc2(F.silu(mlp.fc1(x)) * mlp.fc3(x)), [x, *mlp.parameters()], dout)
    for name, a, b in zip(["x", *dict(mlp.named_parameters())], ours, unfused):
        assert_close(a, b, 1e-12, name)


def test_module_runs_hooks_on_its_projections(device):
    """A hook on fc1 or fc3 (or a forward replaced on the instance) runs: the module then calls the
    two Linears instead of reading their stacked weights."""
    mlp = ak.nn.SwiGLU(12, 20).to(device)
    x = torch.randn(3, 12, device=device)
    plain = mlp(x)
    handle = mlp.fc3.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    expected = mlp.fc2(F.silu(F.linear(x, mlp.fc1.weight)) * F.linear(x * 2, mlp.fc3.weight))
    assert_close(mlp(x), expected, 3e-5, "pre-hook on fc3")
    assert not torch.allclose(mlp(x), plain)
    handle.remove()
    original = mlp.fc1.forward
    mlp.fc1.forward = lambda t: original(t) + 1.0  # what accelerate's hooks look like
    assert_close(mlp(x), mlp.fc2(F.silu(original(x) + 1.0) * mlp.fc3(x)), 3e-5, "replaced forward")
    del mlp.fc1.forward
    assert torch.equal(mlp(x), plain)  # hooks gone: the stacked path again


# ---- GPU: bf16 and real sizes ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2816, 4096, 5632, 8192])
def test_gpu_bf16_real_sizes(hidden):
    x = torch.randn(16384, 2 * hidden, device="cuda").bfloat16()
    _check_against_reference(ak.swiglu_packed, ref.swiglu_packed, (x,))
    _check_against_reference(ak.swiglu, ref.swiglu, (x[:, :hidden], x[:, hidden:]))
