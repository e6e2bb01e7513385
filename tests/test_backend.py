"""Backend selection: names, context manager, environment default, fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

import aimv2_kernels as ak
from aimv2_kernels import backend


def test_set_and_use_backend():
    ak.set_backend("torch")
    assert ak.get_backend() == "torch"
    with ak.use_backend("triton"):
        assert ak.get_backend() == "triton"
        with ak.use_backend("auto"):
            assert ak.get_backend() == "auto"
        assert ak.get_backend() == "triton"
    assert ak.get_backend() == "torch"


def test_available_backends_always_has_torch():
    names = ak.available_backends()
    assert names[-1] == "torch"
    assert set(names) <= {"triton", "cuda", "torch"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_cuda_backend_reports_why_it_is_unavailable():
    assert "cuda" not in ak.available_backends()
    reason = ak.unavailable_reason("cuda")
    assert reason and "CUDA" in reason


def test_cpu_tensors_run_the_reference_unless_triton_interpreter_is_chosen():
    with ak.use_backend("auto"):
        assert backend.resolve("rms_norm_fwd", torch.device("cpu"))[0] == "torch"
    with ak.use_backend("cuda"):
        assert backend.resolve("rms_norm_fwd", torch.device("cpu"))[0] == "torch"


def test_environment_variable_sets_default_and_is_validated():
    code = "import aimv2_kernels as ak; print(ak.get_backend())"
    env = dict(os.environ, AIMV2_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["AIMV2_KERNELS_BACKEND"] = "fastest"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "AIMV2_KERNELS_BACKEND" in bad.stderr and "fastest" in bad.stderr


def test_unknown_kernel_is_an_error():
    with pytest.raises(KeyError, match="no_such_kernel"):
        backend.resolve("no_such_kernel", torch.device("cpu"))


def test_backward_runs_on_the_backend_of_its_forward(monkeypatch):
    # The backward may run on another thread (CUDA autograd workers) where a `use_backend` block is
    # not in force; it must still use the backend the forward ran with.
    import threading

    seen = []
    real = backend.resolve

    def spy(kernel, device, example=None):
        seen.append((kernel, backend.get_backend()))
        return real(kernel, device, example)

    monkeypatch.setattr("aimv2_kernels.ops.swiglu.resolve", spy)
    ak.set_backend("auto")
    g, u = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with ak.use_backend("torch"):
        out = ak.swiglu(g, u)
    worker = threading.Thread(target=lambda: out.sum().backward())
    worker.start()
    worker.join()
    assert seen == [("swiglu_fwd", "torch"), ("swiglu_bwd", "torch")]
    assert g.grad is not None


def test_auto_loads_backends_before_choosing():
    # In a fresh process nothing but the reference is registered until a backend is first asked
    # about; "auto" must ask (and so load) before deciding, not fall through to the reference.
    code = (
        "import torch; from aimv2_kernels import backend; "
        "print(backend.resolve('rms_norm_fwd', torch.device('cuda'))[0])"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", AIMV2_KERNELS_BACKEND="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "triton"
