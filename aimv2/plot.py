"""`aimv2-plot DIR [DIR ...]`: loss curves of one or more runs into loss.png.

With several run directories the curves are overlaid (labelled by directory name), e.g. a run
beside its `--blank-images` control; the figure goes to the first directory unless --output says.
"""
from __future__ import annotations

import os
import sys

from .cli import ArgumentParser
from .cli import run as run_command
from .metrics import read_metrics

PANELS = (("loss", "total loss"), ("pixel_loss", "pixel loss"), ("text_loss", "text loss"), ("lr", "learning rate"))


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing moving average, so noisy per-step losses show their trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_runs(run_dirs: list[str], output: str | None = None) -> str:
    """Draw the panels for every run that has metrics; return the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(d, read_metrics(os.path.join(d, "metrics.jsonl"))) for d in run_dirs]
    runs = [(d, r) for d, r in runs if r]
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl with records in {run_dirs}")
    output = output or os.path.join(run_dirs[0], "loss.png")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for run_dir, records in runs:
        label = os.path.basename(os.path.normpath(run_dir))
        for ax, (key, title) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            width = 1 if key == "lr" else max(1, len(values) // 50)
            ax.plot(steps, _smooth(list(values), width), label=label)
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax in axes[:3]:
        ax.set_yscale("log")
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    """The command: exit status 0, or 2 / 1 with one line for a bad option / nothing to plot (aimv2.cli)."""
    parser = ArgumentParser(prog="aimv2-plot", description="Plot the loss curves of aimv2-train runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="DIR", help="run output directories (holding metrics.jsonl)")
    parser.add_argument("--output", help="image to write (default: DIR/loss.png of the first DIR)")
    args = parser.parse_args(argv)

    def body() -> int:
        print(plot_runs(args.run_dirs, args.output))
        return 0

    return run_command("aimv2-plot", body, argv, failures=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
