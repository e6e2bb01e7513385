"""What "auto" runs on a card it has measurements for: the fastest backend per (op, dtype, size class).

`python -m benchmarks --write-auto-table` (on a GPU) times every op on each of our backends and writes
`aimv2_kernels/auto_tables/<card>.json`, e.g. nvidia_h200.json:

    {"card": "NVIDIA H200", "measured": {"commit": ..., "date": ..., "torch": ..., "triton": ...},
     "cuda_tests": "passed",
     "choices": [{"op": "rms_norm", "dtype": "bfloat16", "size_class": "large", "backend": "cuda",
                  "ms": {"ours-cuda": 0.43, "ours-triton": 0.76}}, ...]}

An op is a kernel family: "rms_norm" covers the kernels rms_norm_fwd and rms_norm_bwd. The size
class of a call is read off its first tensor argument (x, gate, q, pred, hidden): SIZE_CLASSES. A
card without a table, or a call whose (op, dtype, size class) the table lacks, takes the registry's
fixed order. This module sits beside the registry and imports nothing of the project.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Optional

TABLE_DIR = Path(__file__).resolve().parent / "auto_tables"
TABLE_DIR_ENV = "AIMV2_KERNELS_AUTO_TABLE_DIR"  # another directory of tables (the writer's tests, trials)

# (name, elements below which a call is in it): about an L2 of bf16 (H100/H200: 50-60 MiB), and 16x that.
SIZE_CLASSES = (("small", 1 << 20), ("medium", 1 << 24), ("large", None))


def size_class(elements: int) -> str:
    for name, below in SIZE_CLASSES:
        if below is None or elements < below:
            return name
    raise AssertionError("the last class has no bound")


def card_slug(card: str) -> str:
    """File name stem of a card's table: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_")


def op_of(kernel: str) -> str:
    """The op (kernel family) a registry kernel belongs to: "rms_norm_bwd" -> "rms_norm"."""
    return re.sub(r"_(fwd|bwd)$", "", kernel)


def table_path(card: str) -> Path:
    return Path(os.environ.get(TABLE_DIR_ENV) or TABLE_DIR) / f"{card_slug(card)}.json"


@functools.lru_cache(maxsize=None)
def _choices(path: str) -> dict[tuple[str, str, str], str]:
    """(op, dtype, size class) -> backend, from one table file; {} when there is none."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return {}
    return {(c["op"], c["dtype"], c["size_class"]): c["backend"] for c in table.get("choices", [])}


def measured_table(card: str) -> dict[tuple[str, str, str], str]:
    """The card's choices, (op, dtype, size class) -> backend; {} without a table."""
    return _choices(str(table_path(card)))


def measured_choice(kernel: str, card: str, dtype: str, elements: int) -> Optional[str]:
    """The backend the card's table measured fastest for this kernel's op at this dtype and size, or
    None (no table for the card, or no row for the call)."""
    return measured_table(card).get((op_of(kernel), dtype, size_class(elements)))


def clear_cache() -> None:
    """Forget the tables read so far (after writing one)."""
    _choices.cache_clear()
