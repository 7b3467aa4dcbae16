"""Held-out perplexity of the unquantized model (from a config) and of quantized folders.

    .venv/bin/python scripts/compare_perplexity.py --config smollm2-135m-int4 out/smollm2-135m-int4 [...]

The text is the held-out half of the built-in English text (never used for calibration).
"""

from __future__ import annotations

import argparse
import json
import time

from qalora_cli.library_logs import quiet_library_logs

quiet_library_logs()  # before torch and transformers import the optional libraries

import torch  # noqa: E402

from qalora_cli.config.loader import load_config  # noqa: E402
from qalora_cli.data.builtin_text import heldout_text  # noqa: E402
from qalora_cli.eval.perplexity import perplexity  # noqa: E402
from qalora_cli.models.loading import load_model  # noqa: E402
from qalora_cli.models.quantized_io import load_quantized  # noqa: E402


def heldout_ppl(model, tokenizer, seq_len: int, max_tokens: int) -> float:
    ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return perplexity(model, ids, seq_len, max_tokens=max_tokens)["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quantized", nargs="*", help="quantized model folders")
    ap.add_argument("--config", default="smollm2-135m-int4", help="config naming the unquantized model")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    cfg = load_config(args.config)
    base, tok, src = load_model(cfg.model)
    rows = [("unquantized " + src.describe().rsplit("/", 1)[-1], heldout_ppl(base, tok, args.seq_len, args.max_tokens))]
    del base
    for folder in args.quantized:
        model, qc = load_quantized(folder, dtype=torch.float32)
        rows.append((f"{folder} (INT{qc['bits']} g{qc['group_size']})", heldout_ppl(model, tok, args.seq_len, args.max_tokens)))
    print(f"\nheld-out perplexity, {args.max_tokens} tokens, windows of {args.seq_len}:")
    for name, ppl in rows:
        change = f"{(ppl / rows[0][1] - 1) * 100:+.1f}%" if name != rows[0][0] else ""
        print(f"  {ppl:9.3f}  {change:>7}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
