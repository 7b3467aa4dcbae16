"""mlx-lm's greedy answers of an `--format mlx` export against the unmerged model's (base +
adapter through qalora's torch path, greedy, float32), record by record (issue 13's target: at least 63 of 64 held-out records identical at INT4). Resumable:
every answer is saved as it comes, and a re-run continues after the last one; mlx's Linux CPU
build multiplies with reference BLAS, 20-35x slower than torch, so the 64 records take a while.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_mlx_answers.py --config smollm2-135m-int4-gguf \\
        --mlx out/bench/export-smollm2-135m-int4-gguf-mlx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import mlx_greedy_answer
from qalora_cli.config.loader import load_config
from qalora_cli.data.instruct import adds_bos, load_records
from qalora_cli.eval.exact_match import exact_match, stop_token_ids
from qalora_cli.eval.task import task_pairs
from qalora_cli.library_logs import quiet_library_logs
from qalora_cli.recipes.merge import merge_paths


def unmerged_answers(cfg, tok, pairs) -> list[str]:
    from qalora_cli.eval.task import generate_responses
    from qalora_cli.export.verify import unmerged_model

    base, adapter, _ = merge_paths(cfg)
    return generate_responses(unmerged_model(base, adapter, "cpu"), tok, [p for p, _ in pairs], 48)


def save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--mlx", type=Path, required=True, help="the --format mlx folder")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--compute", default="float32", help="the dtype mlx-lm computes in")
    p.add_argument("--output", type=Path, default=Path("out/bench/mlx_answers.json"))
    args = p.parse_args()
    quiet_library_logs()
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from transformers import AutoTokenizer

    cfg = load_config(args.config, [])
    tok = AutoTokenizer.from_pretrained(merge_paths(cfg)[0])
    pairs = task_pairs(load_records(cfg.data)[1][:args.examples], cfg.data, tok)
    state = json.loads(args.output.read_text()) if args.output.is_file() else {"answers": [], "seconds": []}
    if "unmerged" not in state:  # the reference: base + adapter, unmerged, through qalora's torch path
        state["unmerged"] = unmerged_answers(cfg, tok, pairs)
        save(state, args.output)
    unmerged = state["unmerged"]
    model, _ = mlx_load(str(args.mlx))
    model.set_dtype(getattr(mx, args.compute))
    stops, adds = set(stop_token_ids(None, tok)), adds_bos(tok)
    for prompt, _ in pairs[len(state["answers"]):]:
        t0 = time.perf_counter()
        state["answers"].append(mlx_greedy_answer(model, tok, prompt, stops, adds, 48))
        state["seconds"].append(round(time.perf_counter() - t0, 2))
        save(state, args.output)
        print(f"{len(state['answers'])}/{len(pairs)} ({state['seconds'][-1]} s)", flush=True)
    refs = [r for _, r in pairs]
    same = sum(a == b for a, b in zip(state["answers"], unmerged))
    summary = {"records": len(pairs), "identical_to_unmerged": same, "exact_match_mlx": exact_match(state["answers"], refs),
               "exact_match_unmerged": exact_match(unmerged, refs), "seconds": round(sum(state["seconds"]), 1)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
