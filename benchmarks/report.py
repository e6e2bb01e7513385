"""Output of a run: the markdown table (printed last), CSV rows, a JSON document for tools, and one
figure with a row of panels per suite.

Written again after every suite, so a run cut short by a time limit still leaves what it measured.
An output folder receives these four files and never a subfolder: a device call brings back a flat
folder of at most 8 files, and `scripts/gpu_check.py` reads results.json from here into its own report.

results.json is one object:
- "env": card name, versions, commit, time and command (what every CSV row repeats);
- "card": the roofs measured at the start of the run (copy_gbps, matmul_tflops, l2_mib);
- "records": one per (case, provider): suite, op, mode, provider, shape, dtype, elements (of the op's
  first tensor argument, or null), ms, metric, unit,
  roof_frac, peak_mib, ours, comparable, ratio_to, extra, note. ratio_to, on our rows only: every
  other provider measured on the same case -> its ms / ours (> 1: ours is faster);
- "targets": one per SPEC section 6 check: suite, label, value (worst over sizes), threshold,
  sense (">=" or "<="), met (true, false, or null when not measured), sizes, informational, and
  line (the markdown line results.md shows).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from .harness import Card, Result
from .targets import Verdict

OUTPUT_FILES = ("results.md", "results.csv", "results.json", "results.png")


def by_case(results: Sequence[Result]) -> list[list[Result]]:
    """The rows of each case (suite, op, mode, size): every provider measured on the same inputs."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.suite, r.op, r.mode, r.size)].append(r)
    return list(groups.values())


def fill_speedups(results: Sequence[Result]) -> None:
    """For each of our rows: the best comparable alternative's time divided by ours (> 1: we win)."""
    for rows in by_case(results):
        alternatives = [r.ms for r in rows if not r.ours and r.comparable and r.ms]
        for r in rows:
            r.speedup = min(alternatives) / r.ms if (r.ours and r.ms and alternatives) else None


def write_csv(path: str, env: dict, results: Iterable[Result]) -> None:
    rows = [dict(env, **r.row()) for r in results]
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def suite_table(results: Sequence[Result]) -> list[str]:
    extra_keys = list(dict.fromkeys(k for r in results for k in r.extra))
    head = ["op", "mode", "size", "provider", "ms", "throughput", "% of roof", "peak MiB", "vs best alt", *extra_keys, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name = f"**{r.provider}**" if r.ours else (r.provider if r.comparable else f"{r.provider} (not compared)")
        cells = [r.op, r.mode, r.size, name, _fmt(r.ms, ".3f"), _fmt(r.metric, ".1f", f" {r.unit}"),
                 _fmt(None if r.roof_frac is None else 100 * r.roof_frac, ".0f", "%"), _fmt(r.peak_mib, ".0f"),
                 _fmt(r.speedup, ".2f", "x"), *[str(r.extra.get(k, "")) for k in extra_keys], r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(env: dict, card: Card, command: str, suites: Sequence[tuple[str, float, Sequence[Verdict]]],
             results: Sequence[Result], smoke: bool) -> str:
    """suites: (name, seconds it took, its targets' verdicts) in run order."""
    lines = [f"## {env['time']} on {env['gpu']}", ""]
    if smoke:
        lines += ["CPU smoke run: no CUDA GPU here, so tiny sizes through the reference and interpreter paths;",
                  "the numbers below only show that the harness works.", ""]
    lines += [
        f"- command: `{command}`",
        f"- versions: torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, python {env['python']}, "
        f"aimv2_kernels {env['aimv2_kernels']} at {env['commit']}; liger-kernel {env['liger_kernel']}, "
        f"flash-attn {env['flash_attn']}, cut-cross-entropy {env.get('cut_cross_entropy', '-')}; "
        f"backends here: {env['backends']}",
        f"- measured roofs: copy {card.copy_gbps:.0f} GB/s, matmul {card.matmul_tflops:.1f} TFLOP/s, L2 {card.l2_mib:.0f} MiB",
        "- ms: median of triton.testing.do_bench (warm-up and compilation excluded); throughput: the op's "
        "minimum bytes or its FLOPs over visible (query, key) pairs, per second; vs best alt: fastest "
        "alternative computing the same thing divided by ours (> 1: ours is faster)",
        "",
    ]
    for name, seconds, targets in suites:
        rows = [r for r in results if r.suite == name]
        lines += [f"### {name} ({seconds:.0f} s)", ""] + suite_table(rows) + [""]
        if targets:
            lines += ["Targets (SPEC section 6):", ""] + [v.line() for v in targets] + [""]
    return "\n".join(lines)


def plot(path: str, x_labels: dict[str, str], results: Sequence[Result]) -> bool:
    """One figure, one row of panels per suite and one panel per (op, mode): size on x, throughput
    on y, one line per provider. False when nothing was measured."""
    measured = [r for r in results if r.metric]
    suites = [s for s in x_labels if any(r.suite == s for r in measured)]
    if not suites:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {s: list(dict.fromkeys((r.op, r.mode) for r in measured if r.suite == s)) for s in suites}
    cols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(suites), cols, figsize=(5.5 * cols, 3.8 * len(suites)), squeeze=False)
    for row, suite in enumerate(suites):
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(panels[suite]):
                ax.axis("off")
                continue
            op, mode = panels[suite][col]
            rows = [r for r in measured if (r.suite, r.op, r.mode) == (suite, op, mode)]
            for provider in dict.fromkeys(r.provider for r in rows):
                pts = sorted((r.x, r.metric) for r in rows if r.provider == provider)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linewidth=2.5 if provider.startswith("ours") else 1.2, label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{suite}: {op} {mode}")
            ax.set_xlabel(x_labels[suite])
            ax.set_ylabel(rows[0].unit)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _finite(value):
    """JSON has no NaN or infinity: a value that is not a finite number is recorded as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def ratios_to_others(r: Result, rows: Sequence[Result]) -> dict[str, float]:
    """Our row against every other provider measured on the same case (its ms / ours); {} otherwise."""
    if not (r.ours and r.ms):
        return {}
    return {o.provider: o.ms / r.ms for o in rows if o is not r and o.ms}


def record(r: Result, rows: Sequence[Result]) -> dict:
    return {
        "suite": r.suite, "op": r.op, "mode": r.mode, "provider": r.provider, "shape": r.size, "dtype": r.dtype,
        "elements": r.elements, "ms": _finite(r.ms), "metric": _finite(r.metric), "unit": r.unit, "roof_frac": _finite(r.roof_frac),
        "peak_mib": _finite(r.peak_mib), "ours": r.ours, "comparable": r.comparable,
        "ratio_to": {k: _finite(v) for k, v in ratios_to_others(r, rows).items()},
        "extra": dict(r.extra), "note": r.note,
    }


def json_document(env: dict, card: Card, results: Sequence[Result], targets: Sequence[Verdict]) -> dict:
    """The run as one JSON object (schema in the module docstring); records in run order."""
    case_of = {id(r): rows for rows in by_case(results) for r in rows}
    card_fields = {k: _finite(v) for k, v in dataclasses.asdict(card).items() if k != "name"}
    return {
        "env": dict(env, card=card.name),
        "card": card_fields,
        "records": [record(r, case_of[id(r)]) for r in results],
        "targets": [{k: _finite(v) for k, v in t.record().items()} for t in targets],
    }


def write_json(path: str, document: dict) -> None:
    text = json.dumps(document, indent=1, allow_nan=False)  # whole text first: no half-written file on error
    with open(path, "w") as f:
        f.write(text + "\n")


def write_outputs(out_dir: str, env: dict, card: Card, text: str, results: Sequence[Result],
                  targets: Sequence[Verdict], x_labels: dict[str, str], with_plot: bool = True) -> list[str]:
    """results.md, results.csv, results.json and results.png into out_dir (no subfolders); returns
    the paths (no PNG when nothing was measured or with_plot is False: the writes after every single
    result skip the slow plot). x_labels: suite name -> what its sizes are, in run order."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in OUTPUT_FILES}
    with open(paths["results.md"], "w") as f:
        f.write(text + "\n")
    write_csv(paths["results.csv"], env, results)
    write_json(paths["results.json"], json_document(env, card, results, targets))
    if not with_plot or not plot(paths["results.png"], x_labels, results):
        del paths["results.png"]
    return list(paths.values())
