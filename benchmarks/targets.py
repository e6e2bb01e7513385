"""Checks of a run against the performance targets of SPEC section 6, one markdown line each.

Every check takes the worst size: a target is met only when it holds at every size measured.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from .harness import Result


def _rows(results: Sequence[Result], suite: str, op: str, mode: str) -> dict[str, list[Result]]:
    by_size: dict[str, list[Result]] = {}
    for r in results:
        if (r.suite, r.op, r.mode) == (suite, op, mode):
            by_size.setdefault(r.size, []).append(r)
    return by_size


def _best_ours(rows: list[Result], key: Callable[[Result], Optional[float]] = lambda r: r.ms) -> Optional[Result]:
    mine = [r for r in rows if r.ours and key(r) is not None]
    return min(mine, key=key) if mine else None


def _verdict(label: str, worst: Optional[float], n: int, threshold: float, fmt: str, higher_is_better: bool = True) -> str:
    if worst is None:
        return f"- {label}: not measured"
    ok = worst >= threshold if higher_is_better else worst <= threshold
    sign = ">=" if higher_is_better else "<="
    return f"- {label}: {worst:{fmt}} at worst over {n} size(s) (target {sign} {threshold:{fmt}}): {'met' if ok else 'NOT met'}"


def speedup_vs(results: Sequence[Result], suite: str, op: str, mode: str, alternative: str, threshold: float,
               label: str) -> str:
    """Our fastest backend against one named alternative: alternative ms / ours."""
    ratios = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows)
        alt = next((r for r in rows if r.provider == alternative and r.ms), None)
        if ours and alt:
            ratios.append(alt.ms / ours.ms)
    return _verdict(label, min(ratios) if ratios else None, len(ratios), threshold, ".2f")


def roof_fraction(results: Sequence[Result], suite: str, op: str, mode: str, threshold: float, label: str) -> str:
    """Our fastest backend's fraction of the measured roof (copy bandwidth or matmul rate)."""
    fracs = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows)
        if ours and ours.roof_frac is not None:
            fracs.append(ours.roof_frac)
    return _verdict(label, min(fracs) if fracs else None, len(fracs), threshold, ".2f")


def memory_ratio(results: Sequence[Result], suite: str, op: str, mode: str, alternative: str, threshold: float,
                 label: str) -> str:
    """Our peak memory divided by an alternative's (lower is better)."""
    ratios = []
    for rows in _rows(results, suite, op, mode).values():
        ours = _best_ours(rows, key=lambda r: r.peak_mib)
        alt = next((r for r in rows if r.provider == alternative and r.peak_mib), None)
        if ours and alt:
            ratios.append(ours.peak_mib / alt.peak_mib)
    return _verdict(label, max(ratios) if ratios else None, len(ratios), threshold, ".3f", higher_is_better=False)


def bandwidth_targets(results: Sequence[Result], suite: str, op: str, name: str) -> list[str]:
    """RMSNorm and SwiGLU: >= 85% of copy bandwidth, no slower than torch.compile and Liger-Kernel."""
    lines = []
    for mode in ("fwd", "fwd+bwd"):
        lines += [
            roof_fraction(results, suite, op, mode, 0.85, f"{name} {mode}, fraction of copy bandwidth"),
            speedup_vs(results, suite, op, mode, "torch.compile", 1.0, f"{name} {mode} vs torch.compile"),
            speedup_vs(results, suite, op, mode, "liger", 1.0, f"{name} {mode} vs Liger-Kernel"),
        ]
    return lines
