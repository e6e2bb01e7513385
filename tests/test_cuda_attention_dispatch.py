"""How the "cuda" backend's attention picks its compiled path, and when it hands a call on.

On any machine: the build plumbing (CuTe headers found, Hopper built as sm_90a) and the input rules
(dtype, head dim, 16-byte rows). On a GPU: the public op under ak.use_backend("cuda") runs the
compiled kernels, forward and backward, against the float64 reference, and falls back with one
warning for what they do not take. The kernels' own edge cases: tests/test_cuda_attention*.py.
"""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels.cuda_backend import ext as cuda_ext
from aimv2_kernels import reference as ref
from helpers import assert_close


# ---- any machine ------------------------------------------------------------------------------------

def test_cutlass_headers_are_found_and_can_be_overridden(monkeypatch, tmp_path):
    (include,) = cuda_ext.cutlass_include_dirs()
    assert (__import__("pathlib").Path(include) / "cute" / "tensor.hpp").is_file()
    monkeypatch.setenv(cuda_ext.CUTLASS_DIR_ENV, str(tmp_path))
    with pytest.raises(cuda_ext.CutlassNotFound, match="no include/cute"):
        cuda_ext.cutlass_include_dirs()
    (tmp_path / "include" / "cute").mkdir(parents=True)
    assert cuda_ext.cutlass_include_dirs() == [str(tmp_path / "include")]


def test_first_use_build_targets_sm_90a_on_hopper(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert cuda_ext.jit_arch_list() == "9.0a"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert cuda_ext.jit_arch_list() == "8.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert cuda_ext.jit_arch_list() == "8.0;9.0a"


def test_inputs_the_compiled_attention_does_not_take():
    from aimv2_kernels.cuda_backend.attention import unsupported_reason

    q = torch.randn(2, 3, 8, 64, dtype=torch.bfloat16)
    assert "float16 and bfloat16" in unsupported_reason(q.float(), q.float(), q.float())
    small = torch.randn(2, 3, 8, 32, dtype=torch.bfloat16)
    assert "head dims (64, 128)" in unsupported_reason(small, small, small)
    odd = torch.randn(2, 8, 3, 65, dtype=torch.bfloat16)[..., :64].transpose(1, 2)  # rows 130 bytes apart
    assert "16-byte" in unsupported_reason(odd, odd, odd)


class _FakeHopper:
    """Stands in for the compiled ops on a CPU machine posing as an H200: records which path ran (and
    the last call's arguments) and checks what the real launchers check (a unit last stride; for
    sm_90's TMA, positive strides that are multiples of 16 bytes), so the routing in cuda_attention is
    tested without a GPU. Its varlen backward writes 1, 2, 3 into dq, dk, dv."""

    def __init__(self, monkeypatch, sm90_error=None, capability=(9, 0), has_code=True):
        from aimv2_kernels.cuda_backend import attention as cuda_attention

        self.calls, self.sm90_error, self.has_code = [], sm90_error, has_code
        self.last_args = ()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(cuda_attention, "_compiled", self._op)
        monkeypatch.setattr(cuda_attention, "_no_sm90a", set())
        monkeypatch.setattr(cuda_attention, "_device_code", {})
        monkeypatch.setattr(cuda_attention, "_sm90a_checked", set())
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)
        self.capturing = False

    def _op(self, name):
        if name == "cuda_attention_sm80_has_code":
            return lambda device: self.has_code

        def run(*args):
            varlen = "varlen" in name
            # q, k, v, out, dout and the gradients: (T, H, D) varlen, else (B, H, S, D)
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == (3 if varlen else 4)]
            for t in tensors:
                assert t.stride(-1) == 1, (name, t.stride())
                if "sm90" in name:
                    assert all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1]), (name, t.stride())
            self.calls.append(name)
            self.last_args = args
            if "sm90" in name and self.sm90_error is not None:
                raise RuntimeError(self.sm90_error)
            if "fwd" in name:
                q = tensors[0]
                lse_shape = (q.shape[1], q.shape[0]) if varlen else q.shape[:3]
                return torch.empty_like(q), torch.empty(lse_shape, dtype=torch.float32)
            if varlen:
                for value, grad in enumerate(tensors[-3:], start=1):
                    grad.fill_(value)
            return None
        return run


def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def test_broadcast_inputs_and_dout_reach_the_kernels_dense(monkeypatch):
    """dout of `.sum()` (all strides 0), of `(out * w).sum()` (strides (0, 0, 0, 1)) and q, k, v
    expanded over heads are made dense for the kernels, never sent to them as they are (sm_90's TMA
    and the sm_80 checks refuse stride 0) nor to a slower backend."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q = _bf16(2, 1, 9, 64).expand(2, 3, 9, 64)  # one head broadcast to three: stride 0 over H
    k, v = _bf16(2, 3, 9, 64), _bf16(2, 3, 9, 64)
    out, lse = cuda_attention.attention_fwd_cuda(q, k, v, None, True, 0.125)
    for dout in (torch.ones(()).to(torch.bfloat16).expand(2, 3, 9, 64), _bf16(64).expand(2, 3, 9, 64)):
        cuda_attention.attention_bwd_cuda(dout, q, k, v, out, lse, None, True, 0.125)
    assert fake.calls == ["cuda_attention_fwd_sm90"] + ["cuda_attention_bwd_sm90"] * 2


def test_the_sm90_backward_design_follows_the_deterministic_switch(monkeypatch):
    """The Hopper backward op's trailing `deterministic` is backend.deterministic_algorithms() at the
    call: its 5-GEMM design (dQ by float32 atomics) by default, the deterministic one under
    AIMV2_KERNELS_DETERMINISTIC=1 (or torch.use_deterministic_algorithms(True))."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    _FakeHopper(monkeypatch)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    monkeypatch.delenv(backend.DETERMINISTIC_ENV, raising=False)
    q = _bf16(1, 2, 5, 64)
    out, lse = cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    last_args = []
    run_hopper = cuda_attention._run_hopper
    monkeypatch.setattr(cuda_attention, "_run_hopper",
                        lambda op, device, args: last_args.append(args[-1]) or run_hopper(op, device, args))
    cuda_attention.attention_bwd_cuda(out, q, q, q, out, lse, None, True, 0.125)
    monkeypatch.setenv(backend.DETERMINISTIC_ENV, "1")
    cuda_attention.attention_bwd_cuda(out, q, q, q, out, lse, None, True, 0.125)
    assert last_args == [False, True]


def test_batch_or_heads_past_the_sm90_grid_run_the_sm80_kernels(monkeypatch):
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    monkeypatch.setattr(cuda_attention, "SM90_MAX_GRID_YZ", 2)  # stands for 65535 without the memory
    q = _bf16(3, 2, 5, 64)
    out, lse = cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    cuda_attention.attention_bwd_cuda(out, q, q, q, out, lse, None, True, 0.125)
    assert fake.calls == ["cuda_attention_fwd_sm80", "cuda_attention_bwd_sm80"]


def test_only_a_build_without_sm90a_code_demotes_the_device(monkeypatch):
    """An sm_90 error for another reason (the first call made during CUDA-graph capture mentions
    "sm_90a code" too) surfaces; only the launcher's no-sm_90a-code error moves the device to sm_80."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    q = _bf16(1, 2, 5, 64)
    _FakeHopper(monkeypatch, sm90_error="the first sm_90 attention call on a device must run outside CUDA "
                "graph capture (it checks once, synchronously, that the library carries sm_90a code)")
    with pytest.raises(RuntimeError, match="graph capture"):
        cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    assert not cuda_attention._no_sm90a
    fake = _FakeHopper(monkeypatch, sm90_error="attention_fwd_sm90: this build of the extension has no sm_90a "
                       "device code (wgmma/TMA need the arch-specific target)")
    with pytest.warns(UserWarning, match="sm_80 attention kernels"):
        cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    assert fake.calls == ["cuda_attention_fwd_sm90", "cuda_attention_fwd_sm80"]


def test_a_card_the_build_has_no_code_for_runs_the_next_backend(monkeypatch):
    """A Blackwell card under the default "8.0;9.0a" build: no compiled kernel is launched; the call goes
    to the next backend with the reason."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch, capability=(10, 0), has_code=False)
    chosen = []
    monkeypatch.setattr(cuda_attention, "_fallback", lambda kernel, reason: chosen.append(reason) or (lambda *a: None))
    q = _bf16(1, 2, 5, 64)
    cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    assert fake.calls == [] and "no device code for compute capability 10.0" in chosen[0]


def test_a_first_call_during_graph_capture_runs_the_sm80_kernels(monkeypatch):
    """The Hopper path checks once, synchronously, that the library has sm_90a code: illegal during
    capture. A first call made while capturing takes the sm_80 kernels; once a Hopper call has run
    outside capture, captured calls take the Hopper kernels too."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q = _bf16(1, 2, 5, 64)
    for capturing in (True, False, True):
        fake.capturing = capturing
        cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    assert fake.calls == ["cuda_attention_fwd_sm80", "cuda_attention_fwd_sm90", "cuda_attention_fwd_sm90"]


@pytest.mark.parametrize("shape", [(0, 3, 5, 64), (2, 0, 5, 64)])
def test_empty_batch_or_heads_launch_nothing(monkeypatch, shape):
    """B or H of 0 reaches the backend (S = 0 is refused by validation); no kernel is launched (TMA
    cannot describe an empty dim) and the results have the op's shapes and layout."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q = _bf16(*shape)
    out, lse = cuda_attention.attention_fwd_cuda(q, q, q, None, True, 0.125)
    assert out.shape == shape and out.transpose(1, 2).is_contiguous() and lse.shape == shape[:3]
    grads = cuda_attention.attention_bwd_cuda(out, q, q, q, out, lse, None, True, 0.125)
    assert [g.shape for g in grads] == [shape] * 3 and fake.calls == []


def test_attention_registers_even_when_its_module_was_imported_first(monkeypatch):
    """The cuda backend package registers the attention kernels by calling register() when the library loads: a
    module imported earlier (by a test, or a user reading unsupported_reason) must not leave the cuda
    backend without attention."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    monkeypatch.setattr(cuda_attention, "_compiled", lambda name: object())
    faked = []
    monkeypatch.setattr(torch.library, "register_fake", lambda name: faked.append(name) or (lambda fn: fn))
    for kernel in ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd"):
        monkeypatch.setitem(backend._REGISTRY, kernel, dict(backend._REGISTRY[kernel]))
        backend._REGISTRY[kernel].pop("cuda", None)
    cuda_attention.register()
    assert backend._REGISTRY["attention_fwd"]["cuda"] is cuda_attention.attention_fwd_cuda
    assert backend._REGISTRY["attention_bwd"]["cuda"] is cuda_attention.attention_bwd_cuda
    assert backend._REGISTRY["attention_varlen_fwd"]["cuda"] is cuda_attention.attention_varlen_fwd_cuda
    assert backend._REGISTRY["attention_varlen_bwd"]["cuda"] is cuda_attention.attention_varlen_bwd_cuda
    assert {f"aimv2_kernels::cuda_attention_varlen_{d}_sm80" for d in ("fwd", "bwd")} <= set(faked)
    # its loader imports kernels.py, which needs the compiled library; its text must make the call
    package = Path(importlib.util.find_spec("aimv2_kernels.cuda_backend").origin).read_text()
    assert "\n    attention.register()\n" in package


def _packed_varlen(T, H=3, D=64):
    """q, k, v (T, H, D): the views of one bf16 (T, 3, H, D) projection."""
    return _bf16(T, 3, H, D).unbind(1)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_varlen_runs_the_sm80_kernels_on_every_card(monkeypatch, capability):
    """Packed sequences take the sm_80 varlen ops on Hopper too; out (T, H, D) and lse (H, T) come back,
    and the gradients are written into the views of one packed (T, 3, H, D) buffer."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch, capability=capability)
    q, k, v = _packed_varlen(12)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    out, lse = cuda_attention.attention_varlen_fwd_cuda(q, k, v, cu, 7, None, True, 0.125)
    assert out.shape == (12, 3, 64) and lse.shape == (3, 12)
    grads = torch.zeros(12, 3, 3, 64, dtype=torch.bfloat16).unbind(1)
    returned = cuda_attention.attention_varlen_bwd_cuda(out, q, k, v, out, lse, cu, 7, None, True, 0.125, grads)
    assert returned is grads and all((g == i).all() for i, g in enumerate(grads, start=1))
    assert fake.calls == ["cuda_attention_varlen_fwd_sm80", "cuda_attention_varlen_bwd_sm80"]


def test_varlen_gradient_buffers_the_kernels_cannot_write_get_a_dense_stand_in(monkeypatch):
    """A gradient view with a last stride other than 1 is computed into a dense buffer and copied in;
    the other elements of its storage stay untouched, the writable views are passed as they are."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q, k, v = _packed_varlen(9)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = cuda_attention.attention_varlen_fwd_cuda(q, k, v, cu, 5, None, True, 0.125)
    storage = torch.zeros(9, 3, 64, 2, dtype=torch.bfloat16)
    dq = storage[..., 0]  # last stride 2
    dk, dv = torch.zeros(2, 9, 3, 64, dtype=torch.bfloat16).unbind(0)
    cuda_attention.attention_varlen_bwd_cuda(out, q, k, v, out, lse, cu, 5, None, True, 0.125, (dq, dk, dv))
    passed = fake.last_args[-3:]
    assert passed[0] is not dq and passed[0].is_contiguous() and passed[1] is dk and passed[2] is dv
    assert (dq == 1).all() and (dk == 2).all() and (dv == 3).all() and (storage[..., 1] == 0).all()


def test_varlen_broadcast_inputs_and_dout_reach_the_kernels_dense(monkeypatch):
    """q expanded over heads and autograd's dout of `.sum()` (all strides 0) are made dense for the
    varlen kernels, never sent to them as they are nor to a slower backend."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q = _bf16(10, 1, 64).expand(10, 3, 64)
    k, v = _bf16(10, 3, 64), _bf16(10, 3, 64)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out, lse = cuda_attention.attention_varlen_fwd_cuda(q, k, v, cu, 7, None, True, 0.125)
    assert all(0 not in t.stride() for t in fake.last_args[:3])
    dout = torch.ones(()).to(torch.bfloat16).expand(10, 3, 64)
    cuda_attention.attention_varlen_bwd_cuda(dout, q, k, v, out, lse, cu, 7, None, True, 0.125)
    assert all(0 not in t.stride() for t in fake.last_args[:4])
    assert fake.calls == ["cuda_attention_varlen_fwd_sm80", "cuda_attention_varlen_bwd_sm80"]


@pytest.mark.parametrize("case", ["head dim", "dtype", "rows"])
def test_varlen_inputs_the_kernels_do_not_take_run_the_next_backend(monkeypatch, case):
    """Forward and backward hand the call on, every argument included, with the reason."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    chosen = []
    monkeypatch.setattr(cuda_attention, "_fallback",
                        lambda kernel, reason: chosen.append((kernel, reason)) or (lambda *a: a))
    T = 6
    q = {"head dim": _bf16(T, 2, 32), "dtype": torch.randn(T, 2, 64),
         "rows": _bf16(T, 2, 65)[..., :64]}[case]  # rows 130 bytes apart
    cu, prefix, grads = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([1, 3]), (q, q, q)
    fwd_args = (q, q, q, cu, 4, prefix, True, 0.5)
    assert cuda_attention.attention_varlen_fwd_cuda(*fwd_args) == fwd_args
    lse = torch.zeros(2, T)
    bwd_args = (q, q, q, q, q, lse, cu, 4, prefix, True, 0.5, grads)
    assert cuda_attention.attention_varlen_bwd_cuda(*bwd_args) == bwd_args
    assert [kernel for kernel, _ in chosen] == ["attention_varlen_fwd", "attention_varlen_bwd"]
    assert {"head dim": "head dims", "dtype": "float16 and bfloat16", "rows": "16-byte"}[case] in chosen[0][1]
    assert fake.calls == []


def test_varlen_without_tokens_launches_nothing(monkeypatch):
    from aimv2_kernels.cuda_backend import attention as cuda_attention

    fake = _FakeHopper(monkeypatch)
    q = _bf16(0, 3, 64)
    cu = torch.zeros(3, dtype=torch.int32)
    out, lse = cuda_attention.attention_varlen_fwd_cuda(q, q, q, cu, 0, None, True, 0.125)
    assert out.shape == (0, 3, 64) and lse.shape == (3, 0) and lse.dtype == torch.float32
    grads = cuda_attention.attention_varlen_bwd_cuda(out, q, q, q, out, lse, cu, 0, None, True, 0.125)
    assert [g.shape for g in grads] == [(0, 3, 64)] * 3 and fake.calls == []


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_attention():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert ak.unavailable_reason("cuda") is None, ak.unavailable_reason("cuda")
    if "cuda" not in backend._REGISTRY["attention_fwd"]:
        pytest.fail("the cuda backend loaded without its attention kernels")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S,prefix", [(67, [0, 5]), (256, [1, 255]), (130, None)])
def test_public_op_runs_the_compiled_kernels(cuda_attention, dtype, D, S, prefix):
    device = cuda_attention
    qkv = torch.randn(2, S, 3, 3, D, device=device, dtype=dtype, requires_grad=True)  # packed projection
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    prefix_t = None if prefix is None else torch.tensor(prefix, device=device)
    with ak.use_backend("cuda"):
        assert backend.resolve("attention_fwd", device)[0] == "cuda"
        out = ak.prefix_causal_attention(q, k, v, prefix_t)
        dout = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv, dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = ref.prefix_causal_attention(q64, k64, v64, prefix_t)
    grads = torch.autograd.grad(expected, (q64, k64, v64), dout.double())
    assert_close(out, expected, 2e-2, "out")
    for i, name in enumerate("qkv"):
        assert_close(dqkv[:, :, i].transpose(1, 2), grads[i], 3e-2, f"d{name}")


@pytest.mark.gpu
def test_unsupported_inputs_fall_back_with_one_warning(cuda_attention):
    q = torch.randn(1, 2, 33, 32, device=cuda_attention, dtype=torch.bfloat16)  # head dim 32
    with ak.use_backend("cuda"), pytest.warns(UserWarning, match="head dims"):
        out = ak.prefix_causal_attention(q, q, q, 4)
    assert_close(out, ref.prefix_causal_attention(q.double(), q.double(), q.double(), torch.tensor([4], device=q.device)),
                 2e-2, "fallback out")


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["sum", "mean", "weighted"])
def test_broadcast_dout_and_expanded_inputs_on_the_compiled_kernels(cuda_attention, loss):
    """autograd's dout of `.sum()` / `.mean()` has strides (0, 0, 0, 0), of `(out * w).sum()`
    (0, 0, 0, 1); q expanded over heads has stride 0 there. The cuda backend runs them on its own
    kernels (no fallback warning) and matches the reference."""
    device = cuda_attention
    q = torch.randn(2, 1, 77, 128, device=device, dtype=torch.bfloat16).expand(2, 3, 77, 128).requires_grad_()
    k, v = (torch.randn(2, 3, 77, 128, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.randn(128, device=device, dtype=torch.bfloat16)
    prefix = torch.tensor([5, 40], device=device)
    reduce = {"sum": lambda o: o.sum(), "mean": lambda o: o.mean(), "weighted": lambda o: (o * w.to(o.dtype)).sum()}[loss]
    with ak.use_backend("cuda"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ak.prefix_causal_attention(q, k, v, prefix)
        grads = torch.autograd.grad(reduce(out), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = ref.prefix_causal_attention(q64, k64, v64, prefix)
    expected_grads = torch.autograd.grad(reduce(expected), (q64, k64, v64))
    assert_close(out, expected, 2e-2, "out")
    for name, got, want in zip("qkv", grads, expected_grads):
        assert_close(got, want, 3e-2, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_public_ops_run_the_compiled_kernels(cuda_attention, monkeypatch, dtype, D, causal):
    """ak.prefix_causal_attention_varlen and its qkvpacked variant under the cuda backend call the
    compiled sm_80 varlen ops (spied) and match the float64 reference, gradients included (the packed
    variant's written into its (T, 3, H, D) buffer by the compiled backward)."""
    from aimv2_kernels.cuda_backend import attention as cuda_attention_module

    device = cuda_attention
    called = []
    compiled = cuda_attention_module._compiled
    monkeypatch.setattr(cuda_attention_module, "_compiled", lambda name: called.append(name) or compiled(name))
    lengths = [67, 0, 1, 130, 7]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    T, H = sum(lengths), 3
    prefix = torch.tensor([5, 0, 1, 200, 3], device=device)
    qkv = torch.randn(T, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(1)
    dout = torch.randn(T, H, D, device=device, dtype=dtype)
    with ak.use_backend("cuda"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert backend.resolve("attention_varlen_fwd", device)[0] == "cuda"
        assert backend.resolve("attention_varlen_bwd", device)[0] == "cuda"
        out = ak.prefix_causal_attention_varlen(q, k, v, cu, max(lengths), prefix, causal=causal)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        out_packed = ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu, max(lengths), prefix, causal=causal)
        (dqkv,) = torch.autograd.grad(out_packed, qkv, dout)
    assert called.count("cuda_attention_varlen_fwd_sm80") == 2 and called.count("cuda_attention_varlen_bwd_sm80") == 2
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = ref.prefix_causal_attention_varlen(q64, k64, v64, cu, prefix if causal else None, causal)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), dout.double())
    for what, got in (("out", out), ("packed out", out_packed)):
        assert_close(got, expected, 2e-2, what)
    for i, name in enumerate("qkv"):
        assert_close(grads[i], expected_grads[i], 3e-2, f"d{name}")
        assert_close(dqkv[:, i], expected_grads[i], 3e-2, f"packed d{name}")
