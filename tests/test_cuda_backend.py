"""The "cuda" backend (csrc/ kernels): loading and its failure reasons on any machine; on a GPU, every
kernel against the float64 reference in fp32/fp16/bf16 at odd and real sizes, forward and backward,
and `torch.library.opcheck` of the compiled ops.

That the sources compile for sm_80/sm_90 is checked by scripts/check_cuda_sources.sh (run by CI).
"""
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCE, assert_close, device_memsets

import aimv2_kernels as ak
from aimv2_kernels import backend
from aimv2_kernels.cuda_backend import ext as cuda_ext
from aimv2_kernels import reference as ref

REPO_CSRC = Path(__file__).resolve().parent.parent / "csrc"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = pytest.mark.usefixtures("poisoned_cuda_outputs")  # tests/conftest.py: outputs start as NaN


# ---- CPU: loading, and why the backend is unavailable -----------------------------------------------

@pytest.fixture
def fresh_status():
    """load_status() is cached per process: clear it around a test that fakes the machine."""
    cuda_ext.load_status.cache_clear()
    yield
    cuda_ext.load_status.cache_clear()


def _fake_gpu_machine(monkeypatch, tmp_path, nvcc):
    """No prebuilt extension, a CUDA device, a CUDA build of torch, and `nvcc` as the toolkit."""
    monkeypatch.setattr(cuda_ext, "_import_prebuilt", lambda: "No module named 'aimv2_kernels._C'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cuda_ext, "_toolkit_nvcc", lambda: nvcc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without a GPU")
def test_unavailable_without_gpu_says_why():
    reason = cuda_ext.load_status()
    assert "aimv2_kernels._C" in reason and "no CUDA device" in reason
    assert "cuda" not in ak.available_backends()
    assert "CUDA" in ak.unavailable_reason("cuda")
    with ak.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run here"):
        backend.resolve("rms_norm_fwd", torch.device("cuda"))


def test_unavailable_without_toolkit_says_why(fresh_status, monkeypatch, tmp_path):
    _fake_gpu_machine(monkeypatch, tmp_path, nvcc=None)
    reason = cuda_ext.load_status()
    assert "aimv2_kernels._C" in reason and "no CUDA toolkit" in reason and "CUDA_HOME" in reason


def test_failed_first_use_build_reports_the_error_and_announces_once(fresh_status, monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed")
    _fake_gpu_machine(monkeypatch, tmp_path, nvcc="/usr/local/cuda/bin/nvcc")
    calls = []

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'aimv2_kernels_cuda':\n"
                           'csrc/rms_norm.cu(10): error: identifier "oops" is undefined')

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    reason = cuda_ext.load_status()
    assert cuda_ext.load_status() == reason  # cached: one build attempt per process
    assert "first-use build failed" in reason and 'identifier "oops" is undefined' in reason
    assert capsys.readouterr().err.count("building the CUDA kernels") == 1
    (call,) = calls
    assert Path(call["build_directory"]).parent == tmp_path / "aimv2_kernels"
    assert "sm9.0" in call["build_directory"]
    built = sorted(Path(s).name for s in call["sources"])
    assert built == sorted(p.name for p in REPO_CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert call["extra_cuda_cflags"] == cuda_ext.NVCC_FLAGS and not call["is_python_module"]


def test_no_jit_env_never_starts_a_first_use_build(fresh_status, monkeypatch, tmp_path):
    """AIMV2_KERNELS_NO_JIT=1 (time-boxed GPU checks): a machine that could build says why it does not,
    and asking which backends exist starts no compile."""
    from torch.utils import cpp_extension

    _fake_gpu_machine(monkeypatch, tmp_path, nvcc="/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("a first-use build started"))
    monkeypatch.setenv("AIMV2_KERNELS_NO_JIT", "1")
    assert cuda_ext._jit_unavailable_reason() == "first-use build disabled (AIMV2_KERNELS_NO_JIT=1)"
    assert "cuda" not in ak.available_backends()
    reason = ak.unavailable_reason("cuda")
    assert "aimv2_kernels._C" in reason and reason.endswith("first-use build disabled (AIMV2_KERNELS_NO_JIT=1)")
    for value in ("0", ""):
        monkeypatch.setenv("AIMV2_KERNELS_NO_JIT", value)
        assert "disabled" not in (cuda_ext._jit_unavailable_reason() or "")


def test_sources_are_found_from_the_checkout():
    assert cuda_ext.source_dir() == REPO_CSRC
    names = {Path(s).name for s in cuda_ext.source_files(REPO_CSRC)}
    assert "bindings.cpp" in names and {"rms_norm.cu", "swiglu.cu", "patch_mse.cu"} <= names


# ---- GPU: every kernel against the float64 reference -------------------------------------------------

# `cuda_backend` (tests/conftest.py): the backend's device, which must load on a GPU machine.
needs_gpu = pytest.mark.gpu


def _rows(shape, dtype, layout, device):
    """A (..., n) tensor: contiguous, a slice of wider rows (row stride > n), or a slice starting one
    element in (rows misaligned for 16-byte packs, so the kernels take the scalar path)."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    wide = torch.randn(*shape[:-1], shape[-1] + 9, dtype=dtype, device=device)
    start = 0 if layout == "strided" else 1
    return wide[..., start:start + shape[-1]]


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


NORM_SHAPES = [(1, 2), (7, 3), (5, 37), (3, 4, 100), (64, 1024), (16, 3072)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("weight", ["none", "same", "float32"])
def test_rms_norm(cuda_backend, dtype, shape, layout, weight):
    x = _rows(shape, dtype, layout, cuda_backend).requires_grad_()
    w = None if weight == "none" else torch.randn(shape[-1], dtype=dtype if weight == "same" else torch.float32,
                                                  device=cuda_backend, requires_grad=True)
    tol = max(TOLERANCE[dtype], TOLERANCE[w.dtype] if w is not None else 0.0)
    with ak.use_backend("cuda"):
        assert backend.resolve("rms_norm_fwd", x.device)[0] == "cuda"
        y = ak.rms_norm(x, w, 1e-5)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64, w64 = _leaf64(x), _leaf64(w) if w is not None else None
    y64 = ref.rms_norm(x64, w64, 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, y64, TOLERANCE[dtype], "y")
    assert_close(x.grad, x64.grad, TOLERANCE[dtype], "dx")
    if w is not None:
        assert w.grad.dtype == w.dtype
        assert_close(w.grad, w64.grad, tol, "dweight")
    _, rstd = torch.ops.aimv2_kernels.cuda_rms_norm_fwd(x.detach(), w.detach() if w is not None else None, 1e-5)
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    assert_close(rstd, torch.rsqrt(x64.detach().pow(2).mean(-1) + 1e-5), 1e-5, "rstd")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 3), (5, 37), (2, 3, 1000), (64, 1024)])
@pytest.mark.parametrize("layout", ["contiguous", "misaligned"])
def test_rms_norm_residual(cuda_backend, dtype, shape, layout):
    x = _rows(shape, dtype, layout, cuda_backend).requires_grad_()
    r = torch.randn(shape, dtype=dtype, device=cuda_backend, requires_grad=True)
    w = torch.randn(shape[-1], dtype=dtype, device=cuda_backend, requires_grad=True)
    with ak.use_backend("cuda"):
        y, stream = ak.rms_norm_residual(x, r, w)
        dy, ds = torch.randn_like(y), torch.randn_like(stream)
        ((y.float() * dy.float()).sum() + (stream.float() * ds.float()).sum()).backward()
    x64, r64, w64 = _leaf64(x), _leaf64(r), _leaf64(w)
    y64, s64 = ref.rms_norm_residual(x64, r64, w64)
    ((y64 * dy.double()).sum() + (s64 * ds.double()).sum()).backward()
    tol = TOLERANCE[dtype]
    assert_close(stream, s64, tol, "x + residual")
    assert_close(y, y64, tol, "y")
    assert_close(x.grad, x64.grad, tol, "dx")
    assert_close(r.grad, r64.grad, tol, "dresidual")
    assert_close(w.grad, w64.grad, tol, "dweight")


@needs_gpu
@pytest.mark.parametrize("n", [11264, 11265, 13000])
def test_rms_norm_backward_at_and_past_the_shared_memory_columns(cuda_backend, n):
    """Up to 11264 columns the dweight partial sums live in shared memory, past that in global memory."""
    x = torch.randn(9, n, device=cuda_backend, requires_grad=True)
    w = torch.randn(n, device=cuda_backend, requires_grad=True)
    with ak.use_backend("cuda"):
        y = ak.rms_norm(x, w)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64, w64 = _leaf64(x), _leaf64(w)
    ref.rms_norm(x64, w64).backward(dy.double())
    assert_close(x.grad, x64.grad, 1e-5, "dx")
    assert_close(w.grad, w64.grad, 1e-5, "dweight")


@needs_gpu
def test_rms_norm_dweight_is_deterministic(cuda_backend):
    x = torch.randn(4096, 1024, device=cuda_backend, dtype=torch.bfloat16)
    w = torch.randn(1024, device=cuda_backend)
    dy = torch.randn_like(x)
    _, rstd = torch.ops.aimv2_kernels.cuda_rms_norm_fwd(x, w, 1e-5)
    first = torch.ops.aimv2_kernels.cuda_rms_norm_bwd(dy, x, w, rstd, None)[1]
    for _ in range(3):
        assert torch.equal(torch.ops.aimv2_kernels.cuda_rms_norm_bwd(dy, x, w, rstd, None)[1], first)


@needs_gpu
@pytest.mark.parametrize("n", [1000, 1024, 3000])  # column tiles of 32: full, and a partial last one
def test_rms_norm_backward_many_rows_and_the_narrow_dx(cuda_backend, n):
    """Many rows (one partial dw row per resident block, summed by the tiled column kernel) against
    float64; the float32 stream's gradient written once more in dy's dtype by the same pass, equal to
    dx rounded; another narrow dtype is cast after the kernel."""
    x = torch.randn(6001, n, device=cuda_backend)  # the float32 stream
    w = torch.rand(n, device=cuda_backend) + 0.5
    dy = torch.randn(6001, n, device=cuda_backend).to(torch.bfloat16)
    _, rstd = torch.ops.aimv2_kernels.cuda_rms_norm_fwd(x, w, 1e-5)
    dx, dw, narrow = torch.ops.aimv2_kernels.cuda_rms_norm_bwd(dy, x, w, rstd, None, torch.bfloat16)
    assert narrow.dtype == torch.bfloat16 and torch.equal(narrow, dx.to(torch.bfloat16))
    x64, w64 = _leaf64(x), _leaf64(w)
    ref.rms_norm(x64, w64).backward(dy.double())
    assert_close(dx, x64.grad, 1e-5, "dx")
    assert_close(dw, w64.grad, 1e-5, "dweight")
    assert torch.equal(torch.ops.aimv2_kernels.cuda_rms_norm_bwd(dy, x, w, rstd, None, torch.float16)[2],
                       dx.to(torch.float16))
    assert torch.ops.aimv2_kernels.cuda_rms_norm_bwd(dy, x, w, rstd, None)[2].numel() == 0


SWIGLU_SHAPES = [(1, 1), (7, 3), (5, 37), (3, 4, 100), (64, 2816), (8, 4096)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "halves", "misaligned"])
def test_swiglu(cuda_backend, dtype, shape, layout):
    if layout == "halves":  # gate and up as the two halves of one (..., 2H) tensor: row stride 2H
        gate, up = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=cuda_backend).chunk(2, dim=-1)
    else:
        gate, up = _rows(shape, dtype, layout, cuda_backend), torch.randn(shape, dtype=dtype, device=cuda_backend)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    with ak.use_backend("cuda"):
        assert backend.resolve("swiglu_fwd", gate.device)[0] == "cuda"
        out = ak.swiglu(gate, up)
        dout = torch.randn_like(out)
        out.backward(dout)
    g64, u64 = _leaf64(gate), _leaf64(up)
    out64 = ref.swiglu(g64, u64)
    out64.backward(dout.double())
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, out64, tol, "out")
    assert_close(gate.grad, g64.grad, tol, "dgate")
    assert_close(up.grad, u64.grad, tol, "dup")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_swiglu_packed(cuda_backend, dtype, shape, layout):
    packed_shape = (*shape[:-1], 2 * shape[-1])  # odd H puts the up half off the 16-byte grid
    x = _rows(packed_shape, dtype, layout, cuda_backend).requires_grad_()
    with ak.use_backend("cuda"):
        assert backend.resolve("swiglu_packed_fwd", x.device)[0] == "cuda"
        out = ak.swiglu_packed(x)
        dout = torch.randn_like(out)
        out.backward(dout)
    x64 = _leaf64(x)
    out64 = ref.swiglu_packed(x64)
    out64.backward(dout.double())
    assert out.shape == shape and out.is_contiguous()
    assert_close(out, out64, TOLERANCE[dtype], "out")
    assert_close(x.grad, x64.grad, TOLERANCE[dtype], "dx")


@needs_gpu
@pytest.mark.parametrize("dtypes", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 7, 13), (3, 17, 588), (4, 256, 588)])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_mse(cuda_backend, dtypes, shape, mask_kind, norm_pix):
    pred_dtype, target_dtype = dtypes
    pred = torch.randn(shape, dtype=pred_dtype, device=cuda_backend, requires_grad=True)
    target = torch.randn(shape, dtype=target_dtype, device=cuda_backend) * 2 + 0.5
    mask = {"none": None, "random": torch.rand(shape[:2], device=cuda_backend) < 0.6,
            "all_false": torch.zeros(shape[:2], dtype=torch.bool, device=cuda_backend)}[mask_kind]
    with ak.use_backend("cuda"):
        assert backend.resolve("patch_mse_fwd", pred.device)[0] == "cuda"
        loss = ak.patch_mse_loss(pred, target, mask, norm_pix=norm_pix)
        (loss * 3.0).backward()
    p64 = _leaf64(pred)
    loss64 = ref.patch_mse_loss(p64, target.double(), mask, norm_pix)
    (loss64 * 3.0).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    if mask_kind == "all_false":
        assert loss.item() == 0.0 and torch.count_nonzero(pred.grad) == 0
        return
    assert_close(loss, loss64, max(TOLERANCE[pred_dtype], 1e-5), "loss")
    assert_close(pred.grad, p64.grad, TOLERANCE[pred_dtype], "dpred")


@needs_gpu
def test_patch_mse_strided_pred(cuda_backend):
    pred = _rows((2, 9, 588), torch.bfloat16, "misaligned", cuda_backend).requires_grad_()
    target = torch.randn(2, 9, 588, device=cuda_backend)
    with ak.use_backend("cuda"):
        ak.patch_mse_loss(pred, target).backward()
    p64 = _leaf64(pred)
    ref.patch_mse_loss(p64, target.double()).backward()
    assert_close(pred.grad, p64.grad, TOLERANCE[torch.bfloat16], "dpred")


@needs_gpu
def test_float64_runs_the_reference_with_one_warning(cuda_backend):
    from aimv2_kernels import cuda_backend as impl

    impl._warned.clear()
    x = torch.randn(4, 8, dtype=torch.float64, device=cuda_backend)
    with ak.use_backend("cuda"):
        with pytest.warns(UserWarning, match="float64"):
            y = ak.rms_norm(x)
        assert_close(y, ref.rms_norm(x), TOLERANCE[torch.float64], "y")


@needs_gpu
def test_empty_inputs_give_the_reference_results(cuda_backend):
    x = torch.randn(0, 8, device=cuda_backend)
    with ak.use_backend("cuda"):
        assert ak.rms_norm(x).shape == (0, 8)
        assert ak.swiglu_packed(x).shape == (0, 4)
        assert ak.patch_mse_loss(torch.randn(0, 3, 8, device=cuda_backend), torch.randn(0, 3, 8, device=cuda_backend)) == 0


@needs_gpu
def test_bad_input_is_a_clear_error(cuda_backend):
    a = torch.randn(4, 8, device=cuda_backend)
    with pytest.raises(RuntimeError, match="up must have shape"):
        torch.ops.aimv2_kernels.cuda_swiglu_fwd(a, torch.randn(4, 9, device=cuda_backend))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.aimv2_kernels.cuda_rms_norm_fwd(a.double(), None, 1e-5)
    with pytest.raises(RuntimeError, match="even last dim"):
        torch.ops.aimv2_kernels.cuda_swiglu_packed_fwd(torch.randn(4, 7, device=cuda_backend))


def _opcheck_cases(device):
    x = torch.randn(3, 5, 40, device=device, dtype=torch.bfloat16)
    w = torch.randn(40, device=device)
    rstd = torch.ops.aimv2_kernels.cuda_rms_norm_fwd(x, w, 1e-5)[1]
    pred, target = torch.randn(2, 6, 12, device=device), torch.randn(2, 6, 12, device=device)
    mask = torch.rand(2, 6, device=device) < 0.5
    ops = torch.ops.aimv2_kernels
    return [
        (ops.cuda_rms_norm_fwd, (x, w, 1e-5)),
        (ops.cuda_rms_norm_fwd, (x, None, 1e-5)),
        (ops.cuda_rms_norm_residual_fwd, (x, torch.randn_like(x), w, 1e-5)),
        (ops.cuda_rms_norm_bwd, (torch.randn_like(x), x, w, rstd, torch.randn_like(x))),
        (ops.cuda_rms_norm_bwd, (torch.randn_like(x), x, None, rstd, None)),
        (ops.cuda_swiglu_fwd, (x, torch.randn_like(x))),
        (ops.cuda_swiglu_bwd, (torch.randn_like(x), x, torch.randn_like(x))),
        (ops.cuda_swiglu_packed_fwd, (x,)),
        (ops.cuda_swiglu_packed_bwd, (torch.randn(3, 5, 20, device=device, dtype=torch.bfloat16), x)),
        (ops.cuda_patch_mse_fwd, (pred, target, mask, True, 1e-6)),
        (ops.cuda_patch_mse_bwd, (torch.tensor(1.5, device=device), pred, target, None, False, 1e-6)),
    ]


@needs_gpu
def test_opcheck_compiled_ops(cuda_backend):
    for op, args in _opcheck_cases(cuda_backend):
        torch.library.opcheck(op, args)


@needs_gpu
def test_opcheck_public_ops_on_the_cuda_backend(cuda_backend):
    x = torch.randn(3, 7, 40, device=cuda_backend, requires_grad=True)
    w = torch.randn(40, device=cuda_backend, requires_grad=True)
    pred = torch.randn(2, 6, 12, device=cuda_backend, requires_grad=True)
    ops = torch.ops.aimv2_kernels
    with ak.use_backend("cuda"):
        torch.library.opcheck(ops.rms_norm, (x, w, 1e-5))
        torch.library.opcheck(ops.rms_norm_residual, (x, torch.randn_like(x), w, 1e-5))
        torch.library.opcheck(ops.swiglu, (x, torch.randn_like(x)))
        torch.library.opcheck(ops.swiglu_packed, (x[..., :40],))
        torch.library.opcheck(ops.patch_mse_loss, (pred, torch.randn(2, 6, 12, device=cuda_backend), None, True, 1e-6))


@needs_gpu
@pytest.mark.parametrize("poison", ["1", "0"])
def test_poison_hook_fills_every_output_before_its_kernel(cuda_backend, monkeypatch, poison):
    """The hook is real: with it on, the profiler sees one device memset per output buffer (y and
    rstd of the forward) queued before the kernel; with it off, none."""
    monkeypatch.setenv("AIMV2_KERNELS_POISON_OUTPUTS", poison)
    x = torch.randn(37, 203, device=cuda_backend)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.aimv2_kernels.cuda_rms_norm_fwd(x, None, 1e-5)
        torch.cuda.synchronize()
    memsets = device_memsets(prof)
    assert len(memsets) == (2 if poison == "1" else 0), [e.name for e in prof.events()]
