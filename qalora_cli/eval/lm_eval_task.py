"""lm-evaluation-harness's own `mmlu_<subject>` task, pointed at local questions: the parity
test and the parity benchmark run lm-eval on exactly the questions qalora scores, offline.

The task is lm-eval's shipped YAML (`mmlu/default/_default_template_yaml` plus the subject's
file), so prompt, few-shot sampler and metric are lm-eval's; only the data source changes from
the hub's `cais/mmlu` to jsonl files in the same schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .mmlu_data import Question


def lm_eval_mmlu_task(subject: str, test: Sequence[Question], dev: Sequence[Question], folder: Path) -> dict:
    """A task config for lm_eval.simple_evaluate(tasks=[...]) named `local_mmlu_<subject>`.
    dev: the few-shot exemplars in order (lm-eval's `first_n` sampler takes them from the
    front); a 0-shot task still needs a dev split, so it gets the first test question."""
    import lm_eval
    import yaml

    tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    cfg = yaml.safe_load((tasks / "_default_template_yaml").read_text())
    sub = yaml.safe_load((tasks / f"mmlu_{subject}.yaml").read_text())
    cfg.update({k: v for k, v in sub.items() if k not in ("include", "tag")})
    files = {}
    for split, qs in (("test", list(test)), ("dev", list(dev) or list(test)[:1])):
        path = folder / f"{subject}_{split}.jsonl"
        path.write_text("".join(json.dumps({"question": q.question, "subject": q.subject, "choices": list(q.choices),
                                            "answer": q.answer}) + "\n" for q in qs))
        files[split] = str(path)
    cfg.update(task=f"local_mmlu_{subject}", dataset_path="json",
               dataset_kwargs={"data_files": files, "cache_dir": str(folder / "hf-cache")})
    return cfg
