"""Plan and run a recipe. Each instance's record (.recipe/NAME.json: its digest and metrics) is
written only after the stage finished, so an interrupted recipe redoes just the unfinished
stage (a fine-tune resumes from its last checkpoint, a quantization after its last block), an
unchanged one is reused, and a changed one is run again over its old output."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..config.loader import read_yaml
from ..shipped import find_shipped
from .execute import STATE_DIR, run_command, stage_commands
from .expand import Instance, expand
from .metrics import row_metrics, stage_metrics
from .results import write_results
from .spec import RecipeSpec, parse_recipe
from .stage_lock import stage_lock


@dataclass
class Recipe:
    spec: RecipeSpec
    source: str
    instances: list[Instance]

    @property
    def root(self) -> Path:
        return Path(self.spec.output)

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR


def load_recipe(name_or_path: str, output: str | None = None) -> Recipe:
    """The recipe, checked whole (stages, configs, sweep values, metrics) before anything runs."""
    path = find_shipped("recipes", name_or_path, "recipe")
    data = read_yaml(path)
    if output:
        data["output"] = output
    spec = parse_recipe(data, f"'{name_or_path}'")
    return Recipe(spec, name_or_path, expand(spec, f"'{name_or_path}'", Path(spec.output)))


def status(recipe: Recipe, inst: Instance) -> str:
    """reuse (finished with these inputs), changed (finished with other inputs), resume (started,
    not finished) or new."""
    record = recipe.state / f"{inst.name}.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("digest") == inst.digest and inst.out.exists():
            return "reuse"
        return "changed"
    return "resume" if inst.out.exists() or _partial(inst).exists() else "new"


def _partial(inst: Instance) -> Path:
    return inst.out.with_name(inst.out.name + ".partial")


def plan(recipe: Recipe) -> list[tuple[Instance, str]]:
    """Each instance with what running the recipe would do, in order. An instance whose inputs
    will be recomputed is recomputed too (its digest is of the inputs' digests, so it follows)."""
    return [(inst, status(recipe, inst)) for inst in recipe.instances]


def run_recipe(recipe: Recipe, echo: Callable[[str], None]) -> dict:
    recipe.state.mkdir(parents=True, exist_ok=True)
    measured: dict[str, dict] = {}
    ran = 0
    for inst in recipe.instances:
        # What to do is decided under the stage's lock, when its turn comes: another run of the
        # recipe may have finished it meanwhile (pipeline/stage_lock.py).
        with stage_lock(recipe.state, inst.name, echo):
            what = status(recipe, inst)
            if what == "reuse":
                measured[inst.name] = json.loads((recipe.state / f"{inst.name}.json").read_text())["metrics"]
                echo(f"[reuse] {inst.name}")
                continue
            echo(f"[{what}] {inst.name}: {inst.spec.run}")
            measured[inst.name] = _run_instance(recipe, inst, what, echo)
            ran += 1
    rows = results_rows(recipe, measured)
    files = write_results(rows, result_columns(recipe), recipe.spec.results.metrics, recipe.spec.results.x,
                          recipe.spec.description or recipe.source, recipe.root)
    return {"ran": ran, "reused": len(recipe.instances) - ran, "rows": rows, "files": [str(f) for f in files]}


def _run_instance(recipe: Recipe, inst: Instance, what: str, echo) -> dict:
    t0 = time.perf_counter()
    if inst.spec.run == "eval":
        inst.out.mkdir(parents=True, exist_ok=True)
    resume = what == "resume" and inst.spec.run in ("finetune", "quantize") and _resumable(inst)
    overwrite = what in ("changed", "resume") and not resume
    log = recipe.state / f"{inst.name}.log"
    for cmd in stage_commands(inst, recipe.state, overwrite, resume):
        run_command(cmd, log, inst.name, echo)
    metrics = stage_metrics(inst)
    record = {"stage": inst.stage, "values": inst.values, "digest": inst.digest, "metrics": metrics,
              "seconds": round(time.perf_counter() - t0, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = recipe.state / f"{inst.name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(recipe.state / f"{inst.name}.json")
    return metrics


def _resumable(inst: Instance) -> bool:
    """A fine-tune resumes from its run folder's checkpoints; a quantization from its .partial folder."""
    if inst.spec.run == "finetune":
        return (inst.out / "checkpoints").is_dir() and any((inst.out / "checkpoints").iterdir())
    return _partial(inst).is_dir()


def result_columns(recipe: Recipe) -> list[str]:
    names = list(recipe.spec.sweep)
    for inst in recipe.instances:
        names += [k for k in inst.columns if k not in names]
    return names


def results_rows(recipe: Recipe, measured: dict[str, dict]) -> list[dict]:
    rows = []
    for inst in recipe.instances:
        if inst.spec.run == "eval":
            rows.append({"label": inst.label, **inst.columns, **row_metrics(inst, measured)})
    return rows


def describe_plan(recipe: Recipe) -> list[str]:
    lines = [f"recipe {recipe.source}: {len(recipe.instances)} stage runs under {recipe.root}"]
    for inst, what in plan(recipe):
        inputs = ", ".join(f"{r}={i.name}" for r, i in inst.inputs.items())
        lines.append(f"  [{what:7s}] {inst.name:32s} {inst.spec.run}" + (f" ({inputs})" if inputs else ""))
    return lines

