"""What the lora.init statistics add to `qalora quantize`, side by side in one run: the same config
quantized without them, with them on the quantized model's inputs, and on the corrected model's
(a third stream, output.init_stats_inputs: corrected). Each run in its own process, one after the
other (round-robin with --rounds); the block-by-block pass's seconds from each quantize_report.json.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_init_stats_cost.py --config smollm2-135m-int4 \\
        calibration.source=builtin calibration.num_samples=32 calibration.seq_len=128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"no statistics": ["output.init_stats=false"],
            "quantized inputs": ["output.init_stats_inputs=quantized"],
            "corrected inputs (default)": ["output.init_stats_inputs=corrected"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the variants round-robin this many times and keep each one's fastest: "
                         "on a shared machine, load that drifts then weighs on every variant alike")
    ap.add_argument("overrides", nargs="*", help="section.key=value, for every variant")
    args = ap.parse_args()
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in VARIANTS.items():
                out = Path(tmp) / f"{name.split()[0]}-{r}"
                cmd = [sys.executable, "-m", "qalora_cli", "quantize", "--config", args.config, *args.overrides,
                       *extra, f"output.dir={out}"]
                subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                seconds = json.loads((out / "quantize_report.json").read_text())["seconds"]
                print(f"round {r + 1}, {name}: block pass {seconds['quantize']:.1f} s, total {seconds['total']:.1f} s",
                      flush=True)
                if name not in best or seconds["quantize"] < best[name][0]:
                    best[name] = (seconds["quantize"], seconds["total"])
    base = best["no statistics"][0]
    print(f"fastest of {args.rounds} round(s):")
    print("| statistics | block pass s | x without | total s |\n|---|---:|---:|---:|")
    for name, (q, t) in best.items():
        print(f"| {name} | {q:.1f} | {q / base:.2f}x | {t:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
