"""Host-side C++ of the CUDA backend that runs without a GPU: csrc/tma_descriptors.h (the Hopper
attention's TMA descriptor cache and the check that a descriptor was encoded), compiled with nvcc and
the extension's own flags (aimv2_kernels/cuda_backend/ext.py) and run as a program. Skipped where there
is no nvcc or no CUTLASS headers.

The refused-descriptor check also pins the build flags: without NDEBUG, CuTe's assert aborts the
program (as it would abort a training process) instead of leaving a zero descriptor to report."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from aimv2_kernels.cuda_backend import ext as cuda_ext

ROOT = Path(__file__).resolve().parent.parent


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


@pytest.fixture(scope="module")
def tma_program(tmp_path_factory) -> Path:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (CUDA toolkit) on this machine")
    try:
        includes = cuda_ext.cutlass_include_dirs()
    except cuda_ext.CutlassNotFound as exc:
        pytest.skip(str(exc))
    binary = tmp_path_factory.mktemp("cuda_host") / "tma_descriptors_test"
    command = [nvcc, "-std=c++17", *cuda_ext.NVCC_FLAGS, f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in includes),
               str(ROOT / "tests" / "cuda_host" / "tma_descriptors_test.cu"), "-o", str(binary)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    return binary


def test_tma_descriptor_cache_and_refusal(tma_program):
    run = subprocess.run([str(tma_program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"status {run.returncode}\n{run.stdout}\n{run.stderr}"
    passed = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(passed) >= 8 and "all checks passed" in run.stdout, run.stdout
    assert "a refused TMA descriptor is left zero, no abort" in run.stdout
