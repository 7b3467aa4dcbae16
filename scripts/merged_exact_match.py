"""Does a merged model keep what fine-tuning taught? Exact-match accuracy on the fine-tune's
held-out task (the config's data section, the embedded record task by default), greedy, float32,
for the unmerged model (base + adapter) and for each merged output given, side by side.

    .venv/bin/python scripts/merged_exact_match.py --config smollm2-135m-int4 \
        out/smollm2-135m-int4-merged out/smollm2-135m-int4-merged-gptq [--examples 64]

A folder holding model.gguf is loaded with transformers' GGUF loader.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qalora_cli.config.loader import load_config
from qalora_cli.data.instruct import load_records
from qalora_cli.eval.exact_match import exact_match, generate_responses
from qalora_cli.eval.task import task_pairs
from qalora_cli.export.verify import unmerged_model
from qalora_cli.kernels.torch_quant_linear import cache_inference_weights
from qalora_cli.library_logs import quiet_library_logs
from qalora_cli.models.quantized_io import load_quantized
from qalora_cli.recipes.merge import merge_paths


def load(folder: Path):
    if (folder / "model.gguf").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
    return load_quantized(folder, "cpu", torch.float32)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("merged", type=Path, nargs="*")
    p.add_argument("--examples", type=int, default=64)
    args = p.parse_args()
    quiet_library_logs()
    cfg = load_config(args.config, [])
    base, adapter, _ = merge_paths(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    _, eval_records, _ = load_records(cfg.data)
    pairs = task_pairs(eval_records[:args.examples], cfg.data, tok)
    refs = [r for _, r in pairs]
    rows = [("unmerged (base + adapter)", lambda: unmerged_model(base, adapter, "cpu"))]
    rows += [(str(m), lambda m=m: load(m)) for m in args.merged]
    answers = {}
    print(f"| model | exact match ({len(pairs)} held-out records) | answers equal to the unmerged model's |")
    print("|---|---:|---:|")
    for name, make in rows:
        model = make()
        cache_inference_weights(model, torch.float32)
        preds = generate_responses(model, tok, [q for q, _ in pairs], cfg.train.max_new_tokens)
        answers[name] = preds
        same = sum(a == b for a, b in zip(preds, answers[rows[0][0]]))
        print(f"| {name} | {100 * exact_match(preds, refs):.1f}% | {same}/{len(preds)} |", flush=True)
        del model


if __name__ == "__main__":
    main()
