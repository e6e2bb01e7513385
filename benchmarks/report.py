"""Output of a run: CSV rows, the markdown table (printed last), and one PNG per suite.

Written again after every suite, so a run cut short by a time limit still leaves what it measured.
An output folder receives three files and never a subfolder: `scripts/gpu_check.sh` writes its own
logs into the same folder and the whole folder must stay within 8 files.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Iterable, Optional, Sequence

from .harness import Card, Result

OUTPUT_FILES = ("results.md", "results.csv", "results.png")


def fill_speedups(results: Sequence[Result]) -> None:
    """For each of our rows: the best comparable alternative's time divided by ours (> 1: we win)."""
    groups: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.suite, r.op, r.mode, r.size)].append(r)
    for rows in groups.values():
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


def markdown(env: dict, card: Card, command: str, suites: Sequence[tuple[str, float, list[str]]],
             results: Sequence[Result], smoke: bool) -> str:
    """suites: (name, seconds it took, target lines) in run order."""
    lines = [f"## {env['time']} on {env['gpu']}", ""]
    if smoke:
        lines += ["CPU smoke run: no CUDA GPU here, so tiny sizes through the reference and interpreter paths;",
                  "the numbers below only show that the harness works.", ""]
    lines += [
        f"- command: `{command}`",
        f"- versions: torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, python {env['python']}, "
        f"aimv2_kernels {env['aimv2_kernels']} at {env['commit']}; liger-kernel {env['liger_kernel']}, "
        f"flash-attn {env['flash_attn']}; backends here: {env['backends']}",
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
            lines += ["Targets (SPEC section 6):", ""] + targets + [""]
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


def write_outputs(out_dir: str, env: dict, text: str, results: Sequence[Result], x_labels: dict[str, str]) -> list[str]:
    """results.md, results.csv and results.png into out_dir (no subfolders); returns the paths.
    x_labels: suite name -> what its sizes are, in run order."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in OUTPUT_FILES]
    with open(paths[0], "w") as f:
        f.write(text + "\n")
    write_csv(paths[1], env, results)
    if not plot(paths[2], x_labels, results):
        paths.pop()
    return paths
