"""Put one gpu_check run into benchmarks/RESULTS.md, newest first.

    python scripts/append_results.py OUTDIR [--results benchmarks/RESULTS.md]

Reads OUTDIR/results.json (card, versions, command, stage outcomes) and OUTDIR/results.md (the
benchmark tables) that `bash scripts/gpu_check.sh OUTDIR` wrote, and inserts a section after the
page's introduction (before its first `## ` heading): the card, the command, each stage's outcome and
the tables. A CPU smoke run is refused: its numbers describe no GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def section(run_dir: Path) -> str:
    data = json.loads((run_dir / "results.json").read_text())
    run = data["run"]
    stages = {s["name"]: s for s in data["stages"]}
    env = stages.get("env", {}).get("env", {})
    card = stages.get("env", {}).get("card") or {}
    lines = [
        f"## {run['started']}: {env.get('card', 'unknown card')} (gpu_check at {run['commit']})",
        "",
        f"- command: `{run['command']}`",
        f"- versions: torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
        f"python {env.get('python')}",
    ]
    if card:
        lines.append(f"- measured in the same run: copy {card.get('copy_gbps')} GB/s, bf16 matmul "
                     f"{card.get('matmul_tflops')} TFLOP/s")
    lines += ["", "| stage | outcome | seconds | detail |", "|---|---|---|---|"]
    for s in data["stages"]:
        detail = s.get("counts") or (f"{s.get('measurements')} measurements" if "measurements" in s else "")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} of {s['budget_s']} | {detail} |")
    failures = [t for t in data.get("tests", []) if t["outcome"] in ("failed", "error")]
    if failures:
        lines += ["", "Test failures, by test function (parametrizations counted; the first message):", ""]
        for test, group in _by_function(failures).items():
            message = next((t["message"] for t in group if t["message"]), "")
            lines.append(f"- `{test}` x{len(group)}: {(message.splitlines() or ['(no message recorded)'])[0][:200]}")
    tables = run_dir / "results.md"
    if tables.exists():
        body = tables.read_text().replace("\n## ", "\n#### ").replace("\n### ", "\n#### ")
        body = body[3:] if body.startswith("## ") else body
        lines += ["", "#### " + body.strip()]
    return "\n".join(lines) + "\n\n"


def _by_function(tests: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for t in tests:
        groups.setdefault(t["test"].split("[")[0], []).append(t)
    return groups


def insert(page: str, new: str) -> str:
    """New section before the first level-2 heading (the intro stays on top)."""
    at = page.find("\n## ")
    return page + "\n" + new if at < 0 else page[: at + 1] + new + page[at + 1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", type=Path)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    data = json.loads((args.outdir / "results.json").read_text())
    if data["run"]["mode"] != "gpu":
        print("append_results: a CPU smoke run describes no GPU; not appended", file=sys.stderr)
        return 2
    args.results.write_text(insert(args.results.read_text(), section(args.outdir)))
    print(f"appended the run of {data['run']['started']} to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
