"""`--dry-run` on quantize, finetune and merge: find the model's shape the way the stage would
find its model, plan the stage's memory, print it. Nothing is loaded but configs, nothing written.
Every method is planned: finetune.method qalora, lora, qlora; merge --format qalora, gptq, gguf,
mlx and float."""

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
    from .quantize_plan import plan_quantize

    if stage == "quantize":
        return plan_quantize(cfg, source_shape(cfg.model))
    if stage == "finetune":
        plan, note = _finetune(cfg)
    elif stage == "merge":
        plan, note = _float_merge(cfg) if cfg.merge.format == "float" else _merge(cfg)
    else:
        raise ValueError(f"no memory plan for the stage '{stage}'")
    if note:
        plan.notes.insert(0, note)
    return plan


def _finetune(cfg: RunConfig) -> tuple[StagePlan, str | None]:
    """QA-LoRA trains on the quantized checkpoint; lora and qlora on the model section's float model."""
    from ..recipes.finetune import run_paths
    from .finetune_plan import plan_finetune
    from .peft_plan import plan_peft_finetune

    if cfg.finetune.method != "qalora":
        return plan_peft_finetune(cfg, source_shape(cfg.model)), None
    shape, note = _quantized_shape(cfg, run_paths(cfg)[0])
    return plan_finetune(cfg, shape, *bits_and_group(shape, cfg.quantize.bits, cfg.quantize.group_size)), note


def _merge(cfg: RunConfig) -> tuple[StagePlan, str | None]:
    from ..recipes.merge import merge_paths
    from .merge_plan import plan_merge

    base, adapter, _ = merge_paths(cfg)
    shape, note = _quantized_shape(cfg, base)
    bits, group = bits_and_group(shape, cfg.quantize.bits, cfg.quantize.group_size)
    return plan_merge(cfg, shape, bits, group, _adapter_rank(adapter, cfg.lora.rank)), note


def _float_merge(cfg: RunConfig) -> tuple[StagePlan, str | None]:
    """The adapter's own base, method and rank (its qalora_base.json and adapter_config.json, no
    weights) when it exists; before it does, the config's model, finetune.method and lora.rank."""
    from ..export.float_merge import float_merge_paths
    from ..lora.peft_models import is_peft_adapter, read_base_record
    from .float_merge_plan import plan_float_merge

    adapter = float_merge_paths(cfg)[0]
    if is_peft_adapter(adapter):
        record, model = read_base_record(adapter)
        method, rank, note = record["method"], _adapter_rank(adapter, cfg.lora.rank, key="r"), None
    elif adapter.exists():
        raise UserError(f"--format float merges a qlora or lora (PEFT) adapter; '{adapter}' is not one")
    elif cfg.finetune.method == "qalora":
        raise UserError(f"--format float merges a qlora or lora adapter: '{adapter}' does not exist yet and "
                        "finetune.method is qalora; set finetune.method lora or qlora to plan it")
    else:
        model, method, rank = cfg.model, cfg.finetune.method, cfg.lora.rank
        note = f"'{adapter}' does not exist yet: planned for a {method} adapter of rank {rank} as the config says"
    return plan_float_merge(cfg, source_shape(model), method, rank, model.dtype), note


def _quantized_shape(cfg: RunConfig, base: Path) -> tuple[ModelShape, str | None]:
    """The quantized checkpoint's shape; before it exists, the shape of the model the config
    quantizes, with the config's bits and group size."""
    if base.exists():
        return checkpoint_shape(base), None
    shape = source_shape(cfg.model)
    return shape, (f"'{base}' does not exist yet: planned for {shape.source} quantized to INT{cfg.quantize.bits} "
                   f"g{cfg.quantize.group_size} as the config says")


def _adapter_rank(adapter: Path, default: int, key: str = "rank") -> int:
    """The adapter's rank from its adapter_config.json when it exists (a config, not weights):
    `rank` in a QA-LoRA adapter's, `r` in a PEFT adapter's."""
    try:
        rank = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return default
    return rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else default


def show_plan(stage: str, cfg: RunConfig, as_json: bool = False) -> StagePlan:
    """Print the plan of `stage` (a table, or JSON on stdout)."""
    plan = plan_stage(stage, cfg)
    print(json.dumps(plan.as_dict(), indent=1) if as_json else render(plan))
    return plan
