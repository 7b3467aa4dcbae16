"""What a finished stage instance measured, read from the reports its stage wrote; and the
results row of an eval instance (its own metrics, then its ancestors')."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .expand import Instance

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_metrics(inst: Instance) -> dict[str, Any]:
    out, run = inst.out, inst.spec.run
    if run == "quantize":
        return {"quantize_s": _read(out / "quantize_report.json").get("seconds", {}).get("total")}
    if run == "finetune":
        r = _read(out / "finetune_report.json")
        return {"train_tokens_per_s": r.get("tokens_per_s"), "train_peak_mib": r.get("peak_memory_mib"),
                "train_s": (r.get("seconds") or {}).get("train"), "eval_loss": (r.get("after") or {}).get("eval_loss")}
    if run == "merge":
        return {"merge_s": _read(out / "merge_report.json").get("seconds", {}).get("total")}
    task, ppl, mmlu = _read(out / "task.json"), _read(out / "ppl.json"), _read(out / "mmlu.json")
    return {"exact_match": task.get("exact_match"), "answer_loss": task.get("answer_loss"), "ppl": ppl.get("ppl"),
            "mmlu": mmlu.get("micro_acc", mmlu.get("acc")), "size_mb": _eval_size_mb(inst)}


def _eval_size_mb(inst: Instance) -> float | None:
    """Bytes on disk of the weights the evaluation loaded from folders: the model's and the
    adapter's (none for an adapter alone, whose base is the float source: no deployable size)."""
    model = inst.inputs.get("model")
    model_path = model.out if model else (Path(inst.spec.model) if inst.spec.model else None)
    if model_path is None or not model_path.exists():
        return None
    adapter = inst.inputs.get("adapter")
    paths = [model_path] + ([adapter.out] if adapter else [])
    return round(sum(_weight_bytes(p) for p in paths) / 1e6, 2)


def _weight_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES
                                           and "checkpoints" not in f.parts and "qalora_init" not in f.parts]
    return sum(f.stat().st_size for f in files)


def row_metrics(inst: Instance, measured: dict[str, dict]) -> dict[str, Any]:
    """The eval instance's metrics, then each ancestor's (nearest first) for what it lacks."""
    row: dict[str, Any] = {}
    queue, seen = [inst], set()
    while queue:
        cur = queue.pop(0)
        if cur.name in seen:
            continue
        seen.add(cur.name)
        for k, v in measured.get(cur.name, {}).items():
            if v is not None and row.get(k) is None:
                row[k] = v
        queue.extend(cur.inputs.values())
    return row
