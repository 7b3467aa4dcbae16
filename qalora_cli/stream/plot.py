"""Perplexity against position for each attention variant of `qalora eval stream` (PNG)."""

from __future__ import annotations

from pathlib import Path


def plot_by_position(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, r in report["variants"].items():
        xs = [(c["start"] + c["end"]) / 2 for c in r["chunks"]]
        ax.plot(xs, [c["ppl"] for c in r["chunks"]], marker="o", markersize=3, label=f"{kind} ({r['ppl']:.2f})")
    cache = report["sinks"] + report["window"]
    ax.axvline(cache, color="grey", linestyle=":", label=f"cache full ({cache})")
    if report.get("trained_context") and report["trained_context"] < report["text_tokens"]:
        ax.axvline(report["trained_context"], color="black", linestyle="--",
                   label=f"trained context ({report['trained_context']})")
    ax.set_yscale("log")
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel("perplexity per chunk")
    ax.set_title(f"{Path(str(report['model'])).name}: {report['text_tokens']} tokens, one at a time", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
