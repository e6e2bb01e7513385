"""Checks of a run against the performance targets of SPEC section 6: one `Verdict` each, which the
report prints as a markdown line and writes as a record into results.json.

Every check takes the worst size: a target is met only when it holds at every size measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .harness import Result


@dataclass
class Verdict:
    """One target: the worst value over the sizes measured against its threshold. `informational`
    targets are shown and recorded but are not part of SPEC section 6 (a peer we report against)."""

    suite: str
    label: str
    value: Optional[float]  # None: no size had both our row and the alternative measured
    threshold: float
    higher_is_better: bool = True
    sizes: int = 0
    fmt: str = ".2f"
    informational: bool = False

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    @property
    def sense(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def line(self) -> str:
        tail = " (informational)" if self.informational else ""
        if self.value is None:
            return f"- {self.label}: not measured{tail}"
        return (f"- {self.label}: {self.value:{self.fmt}} at worst over {self.sizes} size(s) "
                f"(target {self.sense} {self.threshold:{self.fmt}}): {'met' if self.met else 'NOT met'}{tail}")

    def record(self) -> dict:
        return {"suite": self.suite, "label": self.label, "value": self.value, "threshold": self.threshold,
                "sense": self.sense, "met": self.met, "sizes": self.sizes, "informational": self.informational,
                "line": self.line()}  # the markdown line too: scripts/gpu_check.py prints it as is


def _rows(results: Sequence[Result], suite: str, op: str, mode: str) -> dict[str, list[Result]]:
    by_size: dict[str, list[Result]] = {}
    for r in results:
        if (r.suite, r.op, r.mode) == (suite, op, mode):
            by_size.setdefault(r.size, []).append(r)
    return by_size


def _best_ours(rows: list[Result], key: Callable[[Result], Optional[float]] = lambda r: r.ms) -> Optional[Result]:
    mine = [r for r in rows if r.ours and key(r) is not None]
    return min(mine, key=key) if mine else None


def _worst(suite: str, label: str, values: list[float], threshold: float, higher_is_better: bool = True,
           fmt: str = ".2f", informational: bool = False) -> Verdict:
    worst = (min(values) if higher_is_better else max(values)) if values else None
    return Verdict(suite, label, worst, threshold, higher_is_better, len(values), fmt, informational)


def speedup_vs(results: Sequence[Result], suite: str, op: str, mode: str, alternative: str, threshold: float,
               label: str, informational: bool = False) -> Verdict:
    """Our fastest backend against one named alternative: alternative ms / ours (> 1: ours is faster)."""
    ratios = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows)
        alt = next((r for r in rows if r.provider == alternative and r.ms), None)
        if ours and alt:
            ratios.append(alt.ms / ours.ms)
    return _worst(suite, label, ratios, threshold, informational=informational)


def roof_fraction(results: Sequence[Result], suite: str, op: str, mode: str, threshold: float, label: str) -> Verdict:
    """Our fastest backend's fraction of the measured roof (copy bandwidth or matmul rate)."""
    fracs = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows)
        if ours and ours.roof_frac is not None:
            fracs.append(ours.roof_frac)
    return _worst(suite, label, fracs, threshold)


def memory_ratio(results: Sequence[Result], suite: str, op: str, mode: str, alternative: str, threshold: float,
                 label: str) -> Verdict:
    """Our peak memory divided by an alternative's (lower is better)."""
    ratios = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows, key=lambda r: r.peak_mib)
        alt = next((r for r in rows if r.provider == alternative and r.peak_mib), None)
        if ours and alt:
            ratios.append(ours.peak_mib / alt.peak_mib)
    return _worst(suite, label, ratios, threshold, higher_is_better=False, fmt=".3f")


def bandwidth_targets(results: Sequence[Result], suite: str, op: str, name: str) -> list[Verdict]:
    """RMSNorm and SwiGLU: >= 90% of copy bandwidth, no slower than torch.compile and Liger-Kernel."""
    verdicts = []
    for mode in ("fwd", "fwd+bwd"):
        verdicts += [
            roof_fraction(results, suite, op, mode, 0.90, f"{name} {mode}, fraction of copy bandwidth"),
            speedup_vs(results, suite, op, mode, "torch.compile", 1.0, f"{name} {mode} vs torch.compile"),
            speedup_vs(results, suite, op, mode, "liger", 1.0, f"{name} {mode} vs Liger-Kernel"),
        ]
    return verdicts
