"""What each merge format costs in quality, on SmolLM2-135M at INT4, INT3 and INT2: each base
(`qalora quantize --config smollm2-135m-intB`) with its trained adapter (`qalora finetune
--config smollm2-135m-intB`), merged exactly (qalora format) and as standard GPTQ (integer
zeros), compared with the unmerged model: logits, held-out perplexity, and MMLU 0-shot on a
per-subject subset.

    .venv/bin/python scripts/bench_merge_loss.py [--bits 4 3 2] [--ppl-tokens 16384] [--mmlu-limit 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QALORA = str(ROOT / ".venv/bin/qalora")


def merge(bits: int, fmt: str, ppl_tokens: int) -> dict:
    out = ROOT / f"out/smollm2-135m-int{bits}-merged" if fmt == "qalora" else \
        ROOT / f"out/smollm2-135m-int{bits}-merged-{fmt}"
    subprocess.run([QALORA, "merge", "--config", f"smollm2-135m-int{bits}", "--format", fmt, "--output", str(out),
                    "--overwrite", f"merge.ppl_tokens={ppl_tokens}", "merge.device=cpu"],
                   check=True, capture_output=True, text=True)
    return {"out": out, **json.loads((out / "merge_report.json").read_text())}


def mmlu(model: Path, limit: int, adapter: Path | None = None) -> float:
    report = model.parent / f".{model.name}-mmlu.json"
    cmd = [QALORA, "eval", "mmlu", "--model", str(model), "--shots", "0", "--limit", str(limit), "--device", "cpu",
           "--output-json", str(report)]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(report.read_text())
    report.unlink()
    return 100 * r["overall"]["micro_acc"], r["overall"]["n"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--mmlu-limit", type=int, default=10, help="questions per subject (0: skip MMLU)")
    args = p.parse_args()
    print("| bits | format | max logit diff / max logit | top-1 agree | ppl unmerged | ppl merged | ppl change | "
          "zero shift max / mean (steps) | clamped | MMLU 0-shot unmerged | merged |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for bits in args.bits:
        base = ROOT / f"out/smollm2-135m-int{bits}"
        acc_unmerged = mmlu(base, args.mmlu_limit, base.with_name(base.name + "-qalora")) if args.mmlu_limit else None
        for fmt in ("qalora", "gptq"):
            r = merge(bits, fmt, args.ppl_tokens)
            v, z = r["verification"], r.get("zero_rounding") or {}
            acc = mmlu(r["out"], args.mmlu_limit) if args.mmlu_limit else None
            shift = f"{z['max_zero_shift']:.2f} / {z['mean_zero_shift']:.3f}" if z else "exact"
            clamped = f"{100 * z['clamped_share']:.3f}%" if z else "-"
            mm = (f"{acc_unmerged[0]:.2f} | {acc[0]:.2f} (n={acc[1]})" if acc else "- | -")
            print(f"| INT{bits} | {fmt} | {v['relative']:.2e} | {100 * v['top1_agreement']:.1f}% | {v['ppl_unmerged']:.4f} "
                  f"| {v['ppl_merged']:.4f} | {100 * v['ppl_change']:+.3f}% | {shift} | {clamped} | {mm} |", flush=True)


if __name__ == "__main__":
    main()
