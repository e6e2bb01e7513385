"""rms_norm_residual with a residual stream wider than the update (issue 13, "The model under bf16
autocast"): a bf16/fp16 update x added to a float32 stream, y in x's dtype, the stream kept in float32.

Against the float64 reference, forward and backward, on every backend that runs here ("torch", and
"triton" in the interpreter on the CPU; on a GPU also CUDA tensors and the "cuda" backend); the custom
op under opcheck and torch.compile(fullgraph=True); the dtype rules of the validation; and one bf16
autocast training step of the tiny model in which every block's norms run the fused op.
"""
from __future__ import annotations

import collections

import pytest
import torch

import aimv2_kernels as ak
from aimv2 import AIMv2Config, AIMv2Model
from aimv2_kernels import backend as backend_registry
from aimv2_kernels import reference as ref
from aimv2_kernels.ops import norm as norm_ops
from helpers import TOLERANCE, rel_err

bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
MIXED = [(bf16, fp32), (fp16, fp32)]  # (update x, residual stream)
SAME = [(fp32, fp32), (fp16, fp16), (bf16, bf16)]
HIDDEN = (17, 127, 1000)
HAS_CUDA = torch.cuda.is_available()


def _cases() -> list:
    """(backend, device) pairs that run real kernels on this machine."""
    cases = [pytest.param("torch", "cpu", id="torch-cpu")]
    if backend_registry.interpreter_enabled() and ak.unavailable_reason("triton") is None:
        cases.append(pytest.param("triton", "cpu", id="triton-interpreter"))
    if HAS_CUDA:
        cases += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu)
                  for name in ("torch", "triton", "cuda")]
    return cases


@pytest.fixture
def poisoned_buffers():
    """The Triton launchers' new output buffers start as NaN, so an element a kernel forgets to write
    shows up (torch.empty on the CPU often hands back zeros)."""
    from aimv2_kernels.triton_backend.common import poisoned_outputs

    with poisoned_outputs():
        yield


Call = collections.namedtuple("Call", "backend dtypes")  # dtypes: of each argument, None for non-tensors


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel name -> a Call per call, for every backend's implementation of the norm kernels (the
    registry is read at every call, so wrapping its entries sees them all)."""
    ak.available_backends()  # loads every backend that can run here, so that its entries exist to wrap
    calls = collections.defaultdict(list)
    for kernel in ("rms_norm_fwd", "rms_norm_residual_fwd", "rms_norm_bwd"):
        for name, impl in list(backend_registry._REGISTRY[kernel].items()):
            monkeypatch.setitem(backend_registry._REGISTRY[kernel], name, _recording(name, impl, calls[kernel]))
    return calls


def _recording(backend: str, impl, log: list):
    def run(*args):
        log.append(Call(backend, tuple(a.dtype if isinstance(a, torch.Tensor) else None for a in args)))
        return impl(*args)

    return run


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """By relative error norm AND per element (|a - e| <= tol * (|e| + rms(e))): a wrong row fails
    even when the rest of the tensor is right."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.pow(2).mean().sqrt()
    worst = float(((a - e).abs() / (e.abs() + scale)).max())
    assert worst <= tol, f"{what}: worst element error {worst:.3e} > {tol:.1e}"


def _run(x, residual, weight, dy, dstream):
    """Forward and backward through ak.rms_norm_residual: (y, stream, dx, dresidual, dweight)."""
    xl, rl = x.detach().requires_grad_(), residual.detach().requires_grad_()
    wl = weight.detach().requires_grad_() if weight is not None else None
    y, stream = ak.rms_norm_residual(xl, rl, wl, eps=1e-5)
    ((y.double() * dy.double()).sum() + (stream.double() * dstream.double()).sum()).backward()
    return y.detach(), stream.detach(), xl.grad, rl.grad, (wl.grad if wl is not None else None)


def _reference64(x, residual, weight, dy, dstream):
    """The reference in float64 on the same (rounded) inputs, differentiated by autograd."""
    xl, rl = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    wl = weight.detach().double().requires_grad_() if weight is not None else None
    y, stream = ref.rms_norm_residual(xl, rl, wl, 1e-5)
    ((y * dy.double()).sum() + (stream * dstream.double()).sum()).backward()
    return y, stream, xl.grad, rl.grad, (wl.grad if wl is not None else None)


def _check(x, residual, weight):
    """Outputs and gradients against float64, each in the dtype the rule gives it: y and dx in x's
    dtype, the stream and dresidual in the residual's, dweight in weight's. An output is held to its own
    dtype's tolerance, or to the stream's where the stream is narrower (a bf16 stream rounds x_hat)."""
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    dstream = torch.randn(x.shape, device=x.device).to(residual.dtype)
    got = _run(x, residual, weight, dy, dstream)
    expected = _reference64(x, residual, weight, dy, dstream)
    dtypes = (x.dtype, residual.dtype, x.dtype, residual.dtype, weight.dtype if weight is not None else None)
    names = ("y", "stream", "dx", "dresidual", "dweight")
    for name, g, e, dtype in zip(names, got, expected, dtypes):
        if dtype is None:
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        _assert_close(g, e, max(TOLERANCE[dtype], TOLERANCE[residual.dtype]), name)


# ---- the reference: the definition of the mixed case ----------------------------------------------

def test_reference_adds_in_float32_and_keeps_each_dtype():
    x, residual, w = torch.randn(4, 33).to(bf16), torch.randn(4, 33), torch.randn(33)
    y, stream = ref.rms_norm_residual(x, residual, w)
    assert (y.dtype, stream.dtype) == (bf16, fp32)
    assert torch.equal(stream, residual + x.float())  # exact: a bf16 value is exact in float32
    assert torch.equal(y, ref.rms_norm(stream, w).to(bf16))


# ---- every backend against float64, forward and backward ------------------------------------------

@pytest.mark.parametrize("backend,device", _cases())
@pytest.mark.parametrize("dtypes", MIXED + SAME, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("hidden", HIDDEN)
def test_matches_float64_reference(poisoned_buffers, kernel_calls, backend, device, dtypes, hidden):
    x_dtype, r_dtype = dtypes
    x = torch.randn(2, 3, hidden, device=device).to(x_dtype)
    residual = (4 * torch.randn(2, 3, hidden, device=device)).to(r_dtype)  # a stream larger than its update
    with ak.use_backend(backend):
        _check(x, residual, torch.rand(hidden, device=device) + 0.5)  # an fp32 parameter, as under autocast
        _check(x, residual, None)
    for kernel in ("rms_norm_residual_fwd", "rms_norm_bwd"):
        assert {call.backend for call in kernel_calls[kernel]} == {backend}, kernel
    assert kernel_calls["rms_norm_residual_fwd"][0].dtypes[:2] == (x_dtype, r_dtype)


@pytest.mark.parametrize("backend,device", _cases())
def test_expanded_position_embedding_as_the_stream(poisoned_buffers, backend, device):
    """The encoder's first norm: patch tokens (B, N, D) bf16 plus a (1, N, D) float32 position
    embedding broadcast over the batch (batch stride 0); its gradient sums over the batch."""
    tokens = torch.randn(3, 10, 48, device=device).to(bf16)
    pos = torch.randn(1, 10, 48, device=device, requires_grad=True)
    w = torch.rand(48, device=device) + 0.5
    dy = torch.randn(3, 10, 48, device=device).to(bf16)
    with ak.use_backend(backend):
        y, stream = ak.rms_norm_residual(tokens, pos.expand(3, -1, -1), w)
        ((y.double() * dy.double()).sum() + stream.double().pow(2).sum()).backward()
    pos64 = pos.detach().double().requires_grad_()
    y64, s64 = ref.rms_norm_residual(tokens.double(), pos64.expand(3, -1, -1), w.double())
    ((y64 * dy.double()).sum() + s64.pow(2).sum()).backward()
    _assert_close(y, y64, TOLERANCE[bf16], "y")
    _assert_close(stream, s64, TOLERANCE[fp32], "stream")
    _assert_close(pos.grad, pos64.grad, TOLERANCE[fp32], "d position embedding")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("hidden", [1024, 1536, 3072])
def test_gpu_real_sizes(backend, hidden):
    reason = ak.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(64, 256, hidden, device="cuda").to(bf16)
    with ak.use_backend(backend):
        assert backend_registry.resolve("rms_norm_residual_fwd", x.device)[0] == backend
        _check(x, 4 * torch.randn(64, 256, hidden, device="cuda"), torch.rand(hidden, device="cuda") + 0.5)


# ---- the custom op: fake kernel, autograd registration, compile ------------------------------------

@pytest.mark.parametrize("backend,device", _cases())
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_opcheck_mixed(backend, device, dtypes):
    x = torch.randn(3, 5, 24, device=device).to(dtypes[0]).requires_grad_()
    residual = torch.randn(3, 5, 24, device=device, dtype=dtypes[1], requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    with ak.use_backend(backend):
        torch.library.opcheck(norm_ops.rms_norm_residual_op, (x, residual, w, 1e-5))
        torch.library.opcheck(norm_ops.rms_norm_residual_op, (x, residual, None, 1e-5))


def test_fake_kernel_gives_each_output_its_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, residual, w = torch.empty(2, 7, 16, dtype=bf16), torch.empty(2, 7, 16), torch.empty(16)
        y, stream, rstd = norm_ops.rms_norm_residual_op(x, residual, w, 1e-5)
    assert (y.dtype, stream.dtype, rstd.dtype) == (bf16, fp32, fp32)
    assert y.is_contiguous() and stream.is_contiguous() and rstd.shape == (2, 7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_fullgraph_and_matches_eager(backend):
    if backend == "triton" and not (backend_registry.interpreter_enabled() and ak.unavailable_reason("triton") is None):
        pytest.skip("the triton case here runs CPU tensors in the interpreter")

    def step(x, residual, w):
        y, stream = ak.rms_norm_residual(x, residual, w)
        return (y.float() * 1.5).sum() + stream.pow(2).sum(), y, stream

    args = (torch.randn(4, 9, 40).to(bf16).requires_grad_(), torch.randn(4, 9, 40, requires_grad=True),
            torch.randn(40, requires_grad=True))
    ak.set_backend(backend)  # a compiled backward runs outside any use_backend block
    eager = step(*args)
    eager_grads = torch.autograd.grad(eager[0], args)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    compiled_grads = torch.autograd.grad(compiled[0], args)
    assert (compiled[1].dtype, compiled[2].dtype) == (bf16, fp32)
    for a, b in zip((*compiled, *compiled_grads), (*eager, *eager_grads)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    assert [g.dtype for g in compiled_grads] == [bf16, fp32, fp32]


# ---- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,r_dtype", [(bf16, fp16), (fp16, bf16), (fp32, bf16), (fp32, fp16),
                                             (fp64, fp32), (bf16, fp64)])
def test_other_dtype_pairs_are_rejected_naming_residual(x_dtype, r_dtype):
    x, residual = torch.randn(2, 8).to(x_dtype), torch.randn(2, 8).to(r_dtype)
    with pytest.raises(TypeError, match=r"residual .*float32"):
        ak.rms_norm_residual(x, residual)


def test_shapes_must_still_match():
    with pytest.raises(ValueError, match="residual must have shape"):
        ak.rms_norm_residual(torch.randn(2, 8).to(bf16), torch.randn(1, 8))


# ---- the model: a bf16 autocast training step runs the fused op in every block ---------------------

def _model_cases() -> list:
    cases = [pytest.param("torch", "cpu", id="torch-cpu")]
    if HAS_CUDA:
        cases += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu) for name in ("triton", "cuda")]
    return cases


@pytest.mark.parametrize("backend,device", _model_cases())
def test_autocast_training_step_runs_every_block_norm_fused(kernel_calls, backend, device):
    """Under autocast the stream is float32 (the position embeddings are float32 parameters) and each
    update a bf16 matmul output; every block's two norms and each final norm must be the fused op."""
    if ak.unavailable_reason(backend) is not None:
        pytest.skip(ak.unavailable_reason(backend))
    cfg = AIMv2Config.preset("tiny")
    model = AIMv2Model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size, (2, cfg.max_text_len), device=device)
    with ak.use_backend(backend):
        with torch.autocast(device, dtype=bf16):
            loss = model(images, tokens)
        loss.total.backward()
        optimizer.step()
    assert torch.isfinite(loss.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    encoder_norms, decoder_norms = 2 * cfg.enc_depth + 1, 2 * cfg.dec_depth + 1  # blocks, then the final norm
    fused = kernel_calls["rms_norm_residual_fwd"]
    assert len(fused) == encoder_norms + decoder_norms
    assert len(kernel_calls["rms_norm_fwd"]) == 1  # the encoder's patch norm: nothing to add there
    # x (the update) bf16 into a float32 stream everywhere but the decoder's first norm, whose update
    # is the [image | text] concatenation (float32: autocast's cat promotes to the widest input).
    mixed = [call for call in fused if call.dtypes[:2] == (bf16, fp32)]
    assert len(mixed) == encoder_norms + decoder_norms - 1
    assert fused[encoder_norms].dtypes[:2] == (fp32, fp32)
    assert len(kernel_calls["rms_norm_bwd"]) == encoder_norms + decoder_norms + 1
    assert {call.backend for calls in kernel_calls.values() for call in calls} == {backend}
