"""pytest benchmarks/: CPU-sized op benchmarks through pytest-benchmark, and tests of the harness.

Like tests/conftest.py, this sets TRITON_INTERPRET=1 before triton is imported when there is no GPU,
so "ours-triton" runs the real kernels in Triton's interpreter. `--benchmark-disable` runs each
benchmark once (as CI does); `--benchmark-only` runs only the timed op benchmarks.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

pytest.importorskip("pytest_benchmark", reason="pytest benchmarks/ needs pytest-benchmark (the test extra)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
