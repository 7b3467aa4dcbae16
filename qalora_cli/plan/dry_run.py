"""`--dry-run` on quantize, finetune and merge: find the model's shape the way the stage would
find its model, plan the stage's memory, print it. Nothing is loaded but configs, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

from ..config.schema import RunConfig
from ..errors import UserError
from .budget import StagePlan
from .quantized_bytes import bits_and_group
from .report import render
from .shapes import ModelShape, checkpoint_shape, source_shape


def plan_stage(stage: str, cfg: RunConfig) -> StagePlan:
    from .finetune_plan import plan_finetune
    from .merge_plan import plan_merge
    from .quantize_plan import plan_quantize

    if stage == "quantize":
        return plan_quantize(cfg, source_shape(cfg.model))
    _check_planned(stage, cfg)
    if stage == "finetune":
        from ..recipes.finetune import run_paths

        shape, note = _quantized_shape(cfg, run_paths(cfg)[0])
        plan = plan_finetune(cfg, shape, *bits_and_group(shape, cfg.quantize.bits, cfg.quantize.group_size))
    elif stage == "merge":
        from ..recipes.merge import merge_paths

        base, adapter, _ = merge_paths(cfg)
        shape, note = _quantized_shape(cfg, base)
        bits, group = bits_and_group(shape, cfg.quantize.bits, cfg.quantize.group_size)
        plan = plan_merge(cfg, shape, bits, group, _adapter_rank(adapter, cfg.lora.rank))
    else:
        raise ValueError(f"no memory plan for the stage '{stage}'")
    if note:
        plan.notes.insert(0, note)
    return plan


def _check_planned(stage: str, cfg: RunConfig) -> None:
    """The plans follow QA-LoRA's code paths; the float baselines (finetune.method qlora, lora and
    their float merge) hold other things, which are not planned."""
    finetune = getattr(cfg, "finetune", None)
    method = getattr(finetune, "method", "qalora")
    if stage == "finetune" and method != "qalora":
        raise UserError(f"--dry-run plans finetune.method qalora; {method} is not planned")
    if stage == "merge" and cfg.merge.format == "float":
        raise UserError("--dry-run plans the merges of a QA-LoRA adapter; merge.format float is not planned")


def _quantized_shape(cfg: RunConfig, base: Path) -> tuple[ModelShape, str | None]:
    """The quantized checkpoint's shape; before it exists, the shape of the model the config
    quantizes, with the config's bits and group size."""
    if base.exists():
        return checkpoint_shape(base), None
    shape = source_shape(cfg.model)
    return shape, (f"'{base}' does not exist yet: planned for {shape.source} quantized to INT{cfg.quantize.bits} "
                   f"g{cfg.quantize.group_size} as the config says")


def _adapter_rank(adapter: Path, default: int) -> int:
    """The adapter's rank from its adapter_config.json when it exists (a config, not weights)."""
    try:
        rank = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("rank")
    except (OSError, ValueError, AttributeError):
        return default
    return rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else default


def show_plan(stage: str, cfg: RunConfig, as_json: bool = False) -> StagePlan:
    """Print the plan of `stage` (a table, or JSON on stdout)."""
    plan = plan_stage(stage, cfg)
    print(json.dumps(plan.as_dict(), indent=1) if as_json else render(plan))
    return plan
