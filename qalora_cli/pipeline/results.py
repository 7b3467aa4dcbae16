"""The recipe's results: one row per eval instance (its label, its sweep values and fixed
columns, the chosen metrics) as results.csv, results.md and a plot, results.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .spec import METRICS

PERCENT = {"exact_match", "mmlu"}


def write_results(rows: list[dict[str, Any]], columns: list[str], metrics: list[str], x: str | None,
                  title: str, out: Path) -> list[Path]:
    """-> the files written (each atomically: a reader never sees half a table)."""
    header = ["label", *columns, *metrics]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    files = [_write(out / "results.csv", buf.getvalue()), _write(out / "results.md", markdown(rows, header, metrics, title))]
    if rows:
        files.append(plot(rows, metrics, x, title, out / "results.png"))
    return files


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def fmt(metric: str, value: Any) -> str:
    if value is None or value == "":
        return ""
    if metric in PERCENT:
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(rows: list[dict], header: list[str], metrics: list[str], title: str) -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h not in metrics else "---:" for h in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(h, r.get(h)) for h in header) + " |")
    lines += ["", "Metrics: " + "; ".join(f"{m}: {METRICS[m][1]}" for m in metrics), ""]
    return "\n".join(lines)


def plot(rows: list[dict], metrics: list[str], x: str | None, title: str, path: Path) -> Path:
    """One panel per metric; a line per label across x (a label without x: a dashed level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for ax, metric in zip(axes[0], metrics):
        for i, label in enumerate(labels):
            pts = [(r.get(x) if x else 0, r.get(metric)) for r in rows if r["label"] == label
                   and r.get(metric) is not None]
            _draw(ax, pts, label, f"C{i}")
        ax.set_title(metric, fontsize=9)
        if x:
            ax.set_xlabel(x)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _draw(ax, pts: list[tuple], label: str, color: str) -> None:
    numeric = [(a, b) for a, b in pts if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if len(numeric) == len(pts) and len(pts) > 1:
        numeric.sort()
        ax.plot([a for a, _ in numeric], [b for _, b in numeric], "o-", label=label, color=color)
    elif pts:  # one value, or an x the others do not share (e.g. LoRA at 16 bits): a level to compare with
        for a, b in pts:
            ax.axhline(b, linestyle="--", color=color, label=label if a == pts[0][0] else None, linewidth=1)
