"""metrics.jsonl: one JSON object per logged step, appended as training goes.

    {"step": 10, "loss": 1.93, "pixel_loss": 0.71, "text_loss": 1.65, "lr": 0.0009, "grad_norm": 0.8,
     "samples_per_s": 412.0, "elapsed_s": 3.1, "skipped": 0}

On resume the log is cut back to the checkpoint's step, so a run that died after its last checkpoint
does not leave duplicate steps behind.
"""
from __future__ import annotations

import json
import math
import os


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Appends records to `path`; `resume_step` drops records past that step first."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        else:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def summarize(records: list[dict], key: str, window: int = 10) -> tuple[float, float] | None:
    """(mean of `key` over the first `window` records, mean over the last `window`), or None."""
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        return None
    w = min(window, len(values))
    return sum(values[:w]) / w, sum(values[-w:]) / w
