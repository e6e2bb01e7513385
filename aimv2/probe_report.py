"""What aimv2-probe reports: per-class metrics, the text table, the confusion-matrix picture, probe.json.

    metrics = probe_metrics(test_labels, predictions, classes)      # plain numbers, JSON-ready
    print(format_table({"trained": metrics}))
    write_confusion_png({"trained": metrics}, "probe_confusion.png", title="attentive probe")

A metrics dict holds `top1`, `balanced_accuracy`, `total`, `correct`, `classes`, `per_class` (one dict
per class: `class`, `support`, `predicted`, `correct`, `recall`, `precision`) and `confusion`
(`confusion[t][p]` counts test images of true class t predicted as p). Per-class accuracy is recall.
A class with no test images has recall None and is left out of the balanced accuracy (the mean of
the recalls); a class the probe never predicts has precision None. Files are written atomically:
to a temporary file in the same directory, then renamed over the final name.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

PNG_NAME = "probe_confusion.png"
JSON_NAME = "probe.json"


def probe_metrics(labels, predictions, classes: Sequence[str]) -> dict:
    """Top-1, balanced accuracy, per-class recall / precision / support and the confusion matrix of
    integer `predictions` against true `labels` (tensors or sequences), for the named classes."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    predictions = torch.as_tensor(predictions, dtype=torch.long).flatten()
    k = len(classes)
    if labels.shape != predictions.shape:
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if len(labels) == 0:
        raise ValueError("no test images to score")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if int(values.min()) < 0 or int(values.max()) >= k:
            raise ValueError(f"{name} must lie in [0, {k}) for {k} classes")
    confusion = torch.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    support = confusion.sum(dim=1).tolist()
    predicted = confusion.sum(dim=0).tolist()
    correct = confusion.diagonal().tolist()
    per_class = []
    for c, name in enumerate(classes):
        per_class.append({
            "class": name,
            "support": support[c],
            "predicted": predicted[c],
            "correct": correct[c],
            "recall": correct[c] / support[c] if support[c] else None,
            "precision": correct[c] / predicted[c] if predicted[c] else None,
        })
    recalls = [row["recall"] for row in per_class if row["recall"] is not None]
    return {
        "classes": list(classes),
        "total": len(labels),
        "correct": sum(correct),
        "top1": sum(correct) / len(labels),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


# ---- the table -------------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def format_table(results: dict[str, dict]) -> str:
    """A plain, aligned text table: one row per class (support, then recall and precision for each
    encoder in `results`, e.g. {"trained": metrics, "random": metrics}), then top-1 and balanced
    accuracy. Every encoder must have been scored on the same test images."""
    labels = list(results)
    first = results[labels[0]]
    names = first["classes"]
    name_w = max(len("balanced acc."), *(len(n) for n in names))
    support_w = max(len("support"), len(str(first["total"])))
    cell_w = len("precision")
    group_w = 2 * cell_w + 2  # recall + precision, two spaces apart

    def row(name: str, support: str, cells: list[str]) -> str:
        line = f"{name:<{name_w}}  {support:>{support_w}}"
        for cell in cells:
            line += f"  {cell:>{cell_w}}"
        return line.rstrip()

    groups = "".join(f"  {label:^{group_w}}" for label in labels)
    lines = [f"{'':<{name_w}}  {'':>{support_w}}{groups}".rstrip()]
    lines.append(row("class", "support", ["recall", "precision"] * len(labels)))
    lines.append("-" * len(lines[-1]))
    for c, name in enumerate(names):
        cells = []
        for label in labels:
            entry = results[label]["per_class"][c]
            cells += [_pct(entry["recall"]), _pct(entry["precision"])]
        lines.append(row(name, str(first["per_class"][c]["support"]), cells))
    lines.append("-" * len(lines[2]))
    lines.append(row("top-1", str(first["total"]), sum(([_pct(results[l]["top1"]), ""] for l in labels), [])))
    lines.append(row("balanced acc.", "", sum(([_pct(results[l]["balanced_accuracy"]), ""] for l in labels), [])))
    return "\n".join(lines)


# ---- files -----------------------------------------------------------------------------------------

def default_out_dir(checkpoint: str | None) -> str:
    """Where the picture and probe.json go without --out: the run directory when `checkpoint` is one
    or is a file <run>/checkpoints/step_*.pt, else the current directory."""
    if checkpoint is None:
        return "."
    if os.path.isdir(checkpoint):
        return checkpoint
    parent = os.path.dirname(os.path.abspath(checkpoint))
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return "."


def output_paths(out: str | None, checkpoint: str | None) -> tuple[str, str]:
    """(picture path, JSON path). `out` ending in .png names the picture (the JSON gets the same name
    with .json); any other `out` is a directory, created if missing; None means default_out_dir."""
    if out is not None and out.lower().endswith(".png"):
        return out, os.path.splitext(out)[0] + ".json"
    directory = default_out_dir(checkpoint) if out is None else out
    return os.path.join(directory, PNG_NAME), os.path.join(directory, JSON_NAME)


def _atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then rename tmp_path over path; never leaves a partial file at path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(report: dict, path: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    _atomic_write(path, write)
    return path


def write_confusion_png(results: dict[str, dict], path: str, title: str = "") -> str:
    """One confusion matrix per encoder, side by side: rows true class, columns predicted, the count
    in each cell and its colour the fraction of the true class (row-normalized)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing left open

    labels = list(results)
    names = results[labels[0]]["classes"]
    k = len(names)
    side = min(max(3.2, 0.55 * k + 1.6), 16.0)
    fig = Figure(figsize=(side * len(labels) + 1.0, side + 0.9), layout="constrained")
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    image = None
    for ax, label in zip(axes, labels):
        m = results[label]
        counts = torch.tensor(m["confusion"], dtype=torch.float64)
        normalized = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        image = ax.imshow(normalized.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        if k <= 30:
            for t in range(k):
                for p in range(k):
                    ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=8 if k > 10 else 10,
                            color="white" if normalized[t, p] > 0.5 else "black")
        ax.set_xticks(range(k), names, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{label} encoder: top-1 {m['top1'] * 100:.1f}%", fontsize=10)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="fraction of the true class")
    if title:
        fig.suptitle(title, fontsize=10)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
