"""Quality of GPTQ vs RTN at INT4/3/2 on SmolLM2-135M: held-out perplexity and mean relative
layer output error, all from one run (speed: scripts/bench_quantize_vs_gptqmodel.py).

    .venv/bin/python scripts/bench_quality.py [--bits 4 3 2] [--max-tokens 16384] [--work out/bench/quality]
        [--variant NAME:section.key=value,...]   (default: rtn and gptq with the built-in configs)

Markdown table on stdout, JSON in the work folder. Existing outputs are reused (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from compare_perplexity import heldout_ppl

from qalora_cli.config.loader import load_config
from qalora_cli.models.loading import load_model
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.quantize import REPORT_NAME, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--variant", nargs="+", default=["rtn:quantize.method=rtn", "gptq:quantize.method=gptq"],
                    help="NAME:overrides, the overrides comma-separated")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", default="out/bench/quality")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)

    base_cfg = load_config("smollm2-135m-int4")
    with torch.no_grad():
        base, tok, _ = load_model(base_cfg.model)
        base_ppl = heldout_ppl(base, tok, args.seq_len, args.max_tokens)
    del base
    rows = []
    for bits in args.bits:
        for variant in args.variant:
            name, _, overrides = variant.partition(":")
            out = work / f"{name}-int{bits}"
            if args.fresh or not (out / REPORT_NAME).is_file():
                cfg = load_config(f"smollm2-135m-int{bits}", [o for o in overrides.split(",") if o] +
                                  [f"output.dir={out}", "output.overwrite=true"])
                run(cfg, show_progress=False)
            report = json.loads((out / REPORT_NAME).read_text())
            with torch.no_grad():
                model, _ = load_quantized(out, dtype=torch.float32)
                ppl = heldout_ppl(model, tok, args.seq_len, args.max_tokens)
            rows.append({"bits": bits, "variant": name, "ppl": ppl, "ppl_change_pct": (ppl / base_ppl - 1) * 100,
                         "mean_rel_output_error": report["mean_rel_output_error"],
                         "quantize_seconds": report["seconds"]["quantize"]})
            print(f"INT{bits} {name}: ppl {ppl:.3f}", file=sys.stderr, flush=True)

    cal = report["calibration"]
    print(f"\nSmolLM2-135M-Instruct, group 32, calibration {cal['num_samples']} x {cal['seq_len']} tokens "
          f"({cal['source']}); held-out perplexity on {args.max_tokens} tokens, windows of {args.seq_len}.")
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Command: {' '.join(sys.argv)}\n")
    print("| bits | variant | perplexity | vs unquantized | mean rel. layer output error |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| 32 | none | {base_ppl:.3f} | | |")
    for r in rows:
        print(f"| {r['bits']} | {r['variant']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.1f}% | "
              f"{r['mean_rel_output_error']:.4g} |")
    (work / "results.json").write_text(json.dumps({"base_ppl": base_ppl, "rows": rows,
                                                   "argv": sys.argv, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
