"""Held-out loss after a short QA-LoRA run at several learning rates, on the embedded task and
the INT4 SmolLM2 checkpoint (run `qalora quantize --config smollm2-135m-int4` first).

    .venv/bin/python scripts/bench_learning_rate.py --steps 16 --lrs 2e-5,2e-4,1e-3

Each run starts from the same adapter initialization and sees the same batches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="smollm2-135m-int4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lrs", default="2e-5,2e-4,1e-3")
    ap.add_argument("--eval-examples", type=int, default=64)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lrs.split(","):
            out = Path(tmp) / f"lr{lr}"
            cmd = [sys.executable, "-m", "qalora_cli", "finetune", "--config", args.config, "--output", str(out),
                   "--max-steps", str(args.steps), f"train.learning_rate={lr}", "train.exact_match_examples=0",
                   f"train.eval_every={args.steps}", f"data.eval_max_examples={args.eval_examples}"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rep = json.loads((out / "finetune_report.json").read_text())
            rows.append((lr, rep["before"]["eval_loss"], rep["after"]["eval_loss"], rep["tokens_per_s"]))
    print(f"{datetime.date.today()}: `{' '.join(['python', *sys.argv])}`\n")
    print(f"| learning rate | held-out loss before | after {args.steps} steps | change | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for lr, b, a, tps in rows:
        print(f"| {lr} | {b:.4f} | {a:.4f} | {100 * (a - b) / b:+.1f}% | {tps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
