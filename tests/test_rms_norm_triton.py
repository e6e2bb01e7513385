"""RMSNorm Triton kernels against the float64 reference. Every test runs on the `device` fixture's
device: CPU tensors through Triton's interpreter on a machine without a GPU, CUDA tensors and the
compiled kernels on one; `gpu`-marked tests add bf16 at real sizes. A launch spy proves the kernels
ran, so no test can pass on the reference fallback by accident."""
import collections
import warnings

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import reference as ref
from aimv2_kernels.backend import resolve
from aimv2_kernels.triton_backend import rms_norm as kernels
from aimv2_kernels.triton_backend import common
from helpers import TOLERANCE, assert_close, rel_err

HIDDEN = (1, 17, 127, 1000, 2816)
LEADING = ((3,), (2, 5), (2, 3, 4))
KERNEL_NAMES = ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_column_sum_kernel")


@pytest.fixture(autouse=True)
def triton_backend():
    reason = ak.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    with ak.use_backend("triton"):
        yield


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's arguments, then launches."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def spy_launches(monkeypatch, module, names):
    """Replace kernels `names` of `module` with spies; returns name -> list of (args, kwargs)."""
    calls = collections.defaultdict(list)
    for name in names:
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), calls[name]))
    return calls


@pytest.fixture
def launches(monkeypatch):
    return spy_launches(monkeypatch, kernels, KERNEL_NAMES)


def _run(x, weight, residual, dy, dstream=None):
    """Forward and backward through the public ops; returns outputs then grads of x, weight, residual."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, residual) if t is not None]
    it = iter(leaves)
    x_, w_, r_ = next(it), (next(it) if weight is not None else None), (next(it) if residual is not None else None)
    if residual is None:
        outs = [ak.rms_norm(x_, w_, eps=1e-5)]
    else:
        outs = list(ak.rms_norm_residual(x_, r_, w_, eps=1e-5))
    loss = (outs[0].double() * dy.double()).sum()
    if dstream is not None:
        loss = loss + (outs[1].double() * dstream.double()).sum()
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _reference(x, weight, residual, dy, dstream=None):
    """The float64 reference on the same (rounded) inputs, via autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, residual) if t is not None]
    it = iter(leaves)
    x_, w_, r_ = next(it), (next(it) if weight is not None else None), (next(it) if residual is not None else None)
    outs = [ref.rms_norm(x_, w_, 1e-5)] if residual is None else list(ref.rms_norm_residual(x_, r_, w_, 1e-5))
    loss = (outs[0] * dy.double()).sum() + ((outs[1] * dstream.double()).sum() if dstream is not None else 0)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


def _check_against_reference(x, weight, residual, with_dstream=False):
    """Kernel outputs and grads vs float64; the error bound is the dtype's tolerance, or twice what
    PyTorch makes at the same precision when the problem itself is ill-conditioned (hidden size 1,
    where dx is a difference of nearly equal terms)."""
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    dstream = torch.randn(x.shape, device=x.device).to(x.dtype) if with_dstream else None
    got = _run(x, weight, residual, dy, dstream)
    expected = _reference(x, weight, residual, dy, dstream)
    with ak.use_backend("torch"):
        same_precision = _run(x, weight, residual, dy, dstream)
    for i, (g, e, p) in enumerate(zip(got, expected, same_precision)):
        assert g.dtype == p.dtype, f"output {i}: dtype {g.dtype}, PyTorch gives {p.dtype}"
        tol = max(TOLERANCE[g.dtype], 2 * rel_err(p, e))
        assert_close(g, e, tol, f"output {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_matches_reference(launches, device, hidden, leading, dtype):
    x = torch.randn(*leading, hidden, device=device).to(dtype)
    _check_against_reference(x, torch.randn(hidden, device=device).to(dtype), None)
    assert launches["_rms_norm_fwd_kernel"] and launches["_rms_norm_bwd_kernel"] and launches["_column_sum_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_without_weight(launches, device, hidden, dtype):
    _check_against_reference(torch.randn(2, 5, hidden, device=device).to(dtype), None, None)
    assert launches["_rms_norm_bwd_kernel"] and not launches["_column_sum_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_residual_matches_reference(launches, device, hidden, dtype):
    x, residual = (torch.randn(2, 3, 4, hidden, device=device).to(dtype) for _ in range(2))
    _check_against_reference(x, torch.randn(hidden, device=device).to(dtype), residual, with_dstream=True)
    assert launches["_rms_norm_fwd_kernel"][0][1]["HAS_RESIDUAL"]
    assert launches["_rms_norm_bwd_kernel"][0][1]["HAS_DRES"]


def test_fp32_weight_with_fp16_input_keeps_each_dtype(launches, device):
    """The autocast case: an fp32 parameter normalizing fp16 activations; dweight comes back in fp32."""
    x, residual, w = torch.randn(4, 6, 96, device=device).half(), torch.randn(4, 6, 96, device=device).half(), torch.randn(96, device=device)
    _check_against_reference(x, w, None)
    _check_against_reference(x, w, residual, True)
    assert launches["_rms_norm_fwd_kernel"] and launches["_column_sum_kernel"]


def _assert_read_in_place(call, tensor):
    """The kernel got `tensor` itself (same memory and strides), not a copy."""
    arg = call[0][0]
    assert arg.data_ptr() == tensor.data_ptr() and arg.stride() == tensor.stride()


@pytest.mark.parametrize("view", ["drop_last_position", "slice_hidden", "permuted_3_levels"])
def test_strided_rows_are_read_in_place(launches, device, view):
    hidden = 40
    if view == "drop_last_position":  # x[:, :-1] of a (B, S, D) tensor: two row levels
        x = torch.randn(3, 7, hidden, device=device)[:, :-1]
    elif view == "slice_hidden":  # a slice of the last dim: row stride 45, not 40
        x = torch.randn(4, 5, hidden + 5, device=device)[..., :hidden]
    else:  # three leading dims that cannot merge
        x = torch.randn(3, 2, 4, hidden, device=device).permute(1, 0, 2, 3)
    weight = torch.randn(2 * hidden, device=device)[::2]  # a strided weight is fine too (copied: it is small)
    _check_against_reference(x, weight, None)
    _assert_read_in_place(launches["_rms_norm_fwd_kernel"][0], x)
    residual = torch.randn_like(x)
    _check_against_reference(x, torch.randn(hidden, device=device), residual.transpose(0, 1).contiguous().transpose(0, 1), True)


def test_four_unmergeable_leading_dims_are_copied_and_correct(launches, device):
    x = torch.randn(2, 3, 2, 2, 24, device=device).permute(3, 1, 0, 2, 4)  # four leading levels: one copy
    _check_against_reference(x, torch.randn(24, device=device), None)
    assert launches["_rms_norm_fwd_kernel"][0][0][0].is_contiguous()


def test_weight_gradient_is_deterministic(launches, device):
    x, w = torch.randn(64, 127, device=device), torch.randn(127, device=device)
    grads = []
    for _ in range(2):
        x_, w_ = x.clone().requires_grad_(), w.clone().requires_grad_()
        ak.rms_norm(x_, w_).backward(torch.ones(64, 127, device=device) + x)
        grads.append(w_.grad)
    n_parts = launches["_column_sum_kernel"][0][0][2]
    assert n_parts > 1, "the test needs several partial sums to reduce"
    assert torch.equal(grads[0], grads[1])


def test_resolves_to_the_triton_implementations(device):
    assert resolve("rms_norm_fwd", device) == ("triton", kernels.rms_norm_fwd)
    assert resolve("rms_norm_residual_fwd", device) == ("triton", kernels.rms_norm_residual_fwd)
    assert resolve("rms_norm_bwd", device) == ("triton", kernels.rms_norm_bwd)


def test_max_hidden_runs_the_kernel(launches, device):
    x, w = torch.randn(2, kernels.MAX_HIDDEN, device=device), torch.randn(kernels.MAX_HIDDEN, device=device)
    assert_close(ak.rms_norm(x, w), ref.rms_norm(x.double(), w.double()), TOLERANCE[torch.float32], "y")
    assert launches["_rms_norm_fwd_kernel"]


def test_wider_rows_fall_back_with_one_warning(launches, device, monkeypatch):
    monkeypatch.setattr(common, "_warned", set())
    x = torch.randn(2, kernels.MAX_HIDDEN + 1, device=device, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="exceeds the Triton kernel's limit"):
        y = ak.rms_norm(x)
    assert_close(y, ref.rms_norm(x.double()), TOLERANCE[torch.float32], "y")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already: a second warning would raise here
        ak.rms_norm(x).sum().backward()
    assert not any(launches.values())


def test_float64_and_empty_inputs(launches, device):
    x = torch.randn(3, 10, dtype=torch.float64, device=device)
    assert_close(ak.rms_norm(x), ref.rms_norm(x), TOLERANCE[torch.float64], "float64")
    assert not launches["_rms_norm_fwd_kernel"]
    empty = torch.randn(0, 4, 8, device=device, requires_grad=True)
    y, stream = ak.rms_norm_residual(empty, empty.detach(), torch.ones(8, device=device))
    assert y.shape == stream.shape == (0, 4, 8)
    (y.sum() + stream.sum()).backward()
    assert empty.grad.shape == empty.shape


def test_module_is_a_drop_in_for_torch_rms_norm(launches, device):
    theirs = torch.nn.RMSNorm(48, eps=1e-6, device=device)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = ak.nn.RMSNorm(48, eps=1e-6).to(device)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == ["weight"]
    x = torch.randn(2, 7, 48, device=device)
    assert_close(ours(x), theirs(x), TOLERANCE[torch.float32], "eps=1e-6")
    assert launches["_rms_norm_fwd_kernel"]
    default_theirs = torch.nn.RMSNorm(48, elementwise_affine=False, device=device)
    default_ours = ak.nn.RMSNorm(48, elementwise_affine=False).to(device)
    assert_close(default_ours(x * 1e-3), default_theirs(x * 1e-3), TOLERANCE[torch.float32], "eps=None")
    assert list(default_ours.state_dict()) == []


# ---- GPU: bf16 and real sizes ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 1536, 2048, 3072, 4096, 8192])
def test_gpu_bf16_real_sizes(hidden):
    x = torch.randn(64, 256, hidden, device="cuda").bfloat16()
    residual = torch.randn_like(x)
    _check_against_reference(x, torch.randn(hidden, device="cuda").bfloat16(), None)
    _check_against_reference(x, torch.randn(hidden, device="cuda"), residual, with_dstream=True)


@pytest.mark.gpu
def test_gpu_strided_view_and_determinism():
    base = torch.randn(64, 257, 1024, device="cuda").bfloat16()
    x, w = base[:, 1:], torch.randn(1024, device="cuda")
    _check_against_reference(x, w, None)
    dy = torch.randn(x.shape, device="cuda").bfloat16()
    grads = [kernels.rms_norm_bwd(dy, x, w, kernels.rms_norm_fwd(x, w, 1e-5)[1], None)[1] for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])
