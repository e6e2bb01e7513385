"""The table "auto" follows: from a run's measurements of our backends, the fastest per (op, dtype,
size class), written for the card as aimv2_kernels/auto_tables/<card>.json (see aimv2_kernels/auto_table.py).

    python -m benchmarks --write-auto-table     # on a GPU: the table suites, then the table

Per (suite, dtype, size class) the backends that ran every case of the class compete on their total
time over those cases (fwd+bwd cases where the suite has them: training runs both directions; else
fwd). A CUDA C++ kernel enters only when the CUDA GPU tests pass in the same run (CUDA_TESTS, run
first); otherwise the table says so and holds the Triton choices alone.

The loss suite is not in the table: its cases time aimv2_loss, whose first tensor (the pixel
prediction) is not the example the linear cross-entropy kernel resolves with (the text hidden
states), so a size class read from one would not be the other's. The loss keeps the fixed order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from .harness import FWD, FWD_BWD, Result
from .providers import DETERMINISTIC_SUFFIX

# suite -> the ops (kernel families) its cases time with the op's own first tensor as `elements`
TABLE_SUITES = {"norm": ("rms_norm",), "swiglu": ("swiglu",), "attention": ("attention",),
                "varlen": ("attention_varlen",)}
REPO = Path(__file__).resolve().parent.parent
CUDA_TESTS = ("tests/test_cuda_backend.py", "tests/test_cuda_cross_entropy.py", "tests/test_cuda_attention.py",
              "tests/test_cuda_attention_sm90.py", "tests/test_cuda_attention_dispatch.py")


def run_cuda_tests(timeout_s: int = 1200) -> str:
    """"passed", or why the CUDA C++ kernels stay out of the table."""
    files = [str(REPO / f) for f in CUDA_TESTS]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        return f"not run: {', '.join(missing)} missing (run from a checkout)"
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"not passed: over {timeout_s} s"
    if done.returncode != 0:
        last = (done.stdout.strip().splitlines() or ["?"])[-1]
        return f"failed: {last}"
    return "passed"


def choices(results: Sequence[Result], cuda_tests: str) -> list[dict]:
    """The table's rows from a run's results (ours only, timed, with elements known)."""
    from aimv2_kernels.auto_table import size_class

    # A deterministic row is not a backend of its own but another backward of one: the table picks
    # backends for the default algorithms.
    ours = [r for r in results if r.ours and r.ms and r.elements and r.suite in TABLE_SUITES
            and r.provider.startswith("ours-") and not r.provider.endswith(DETERMINISTIC_SUFFIX)
            and (cuda_tests == "passed" or r.provider != "ours-cuda")]
    modes = defaultdict(set)
    for r in ours:
        modes[r.suite].add(r.mode)
    # (suite, dtype, class) -> case -> backend -> ms
    groups: dict[tuple, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in ours:
        if r.mode != (FWD_BWD if FWD_BWD in modes[r.suite] else FWD):
            continue
        groups[(r.suite, r.dtype, size_class(r.elements))][(r.size, r.mode)][r.provider.removeprefix("ours-")] = r.ms
    rows = []
    for (suite, dtype, klass), cases in sorted(groups.items()):
        everywhere = set.intersection(*(set(by_backend) for by_backend in cases.values()))
        if not everywhere:
            continue
        totals = {b: sum(by_backend[b] for by_backend in cases.values()) for b in everywhere}
        best = min(sorted(totals), key=totals.get)
        for op in TABLE_SUITES[suite]:
            rows.append({"op": op, "dtype": dtype, "size_class": klass, "backend": best, "cases": len(cases),
                         "ms": {f"ours-{b}": round(t, 4) for b, t in sorted(totals.items())}})
    return rows


def write(card: str, env: dict, rows: list[dict], cuda_tests: str) -> Path:
    """The card's table, written atomically (a reader never sees half a file); returns its path."""
    from aimv2_kernels.auto_table import clear_cache, table_path

    path = table_path(card)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {"card": card, "measured": {k: env.get(k, "") for k in ("commit", "time", "torch", "triton", "cuda")},
             "cuda_tests": cuda_tests, "choices": rows}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    clear_cache()
    return path
