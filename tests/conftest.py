"""Test harness: real Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection, when
no GPU is present. Tests marked `gpu` are skipped on such machines.
"""
import os
import sys

import pytest


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # keep Triton's current default, without its warning

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# by file path: this conftest is also imported as `tests.conftest` from other roots (test_gpu_check.py)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torchvision_shim  # noqa: E402

try:  # before any test imports timm or transformers, which import torchvision when it is installed
    TORCHVISION = torchvision_shim.install()
except Exception as exc:  # noqa: BLE001 - the tests that need it skip and say why
    TORCHVISION = f"does not import ({type(exc).__name__}: {exc})"


def pytest_report_header(config):
    return f"torchvision (for timm): {TORCHVISION}"


def pytest_runtest_logreport(report):
    """With AIMV2_TEST_EVENTS=PATH, append every failure to PATH (one JSON line) the moment it
    happens, so a run killed at a deadline (scripts/gpu_check.sh) still knows why each test failed.
    Under pytest-xdist the controller writes (workers forward their reports to it)."""
    path = os.environ.get("AIMV2_TEST_EVENTS")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import json

    text = report.longreprtext or ""
    errors = [line[2:].strip() for line in text.splitlines() if line.startswith("E ")]
    message = " | ".join(errors[:4]) or (text.strip().splitlines() or [""])[-1]
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "when": report.when, "message": message[:600]}) + "\n")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    """Every test starts from a fixed seed and the process-default backend."""
    import aimv2_kernels as ak

    torch.manual_seed(0)
    previous = ak.get_backend()
    yield
    ak.set_backend(previous)


@pytest.fixture
def one_thread():
    """Gradcheck evaluates tiny float64 ops thousands of times: one thread avoids OpenMP contention
    (with several test processes sharing the cores, 2 threads made one gradcheck take 10-40 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def cuda_backend():
    """The "cuda" backend's device. It must load on a GPU machine: a build failure fails here, with its
    reason. Skips without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import aimv2_kernels as ak

    reason = ak.unavailable_reason("cuda")
    assert reason is None, reason
    return torch.device("cuda")


@pytest.fixture
def poisoned_cuda_outputs(monkeypatch):
    """Every output the csrc/ launchers allocate is filled with NaN bytes before its kernel runs
    (AIMV2_KERNELS_POISON_OUTPUTS, read by csrc/common.cuh), so an element a kernel forgets to write
    shows up as NaN instead of whatever the caching allocator held. The test files of the CUDA C++
    kernels use it for every test: `pytestmark = pytest.mark.usefixtures("poisoned_cuda_outputs")`."""
    monkeypatch.setenv("AIMV2_KERNELS_POISON_OUTPUTS", "1")
