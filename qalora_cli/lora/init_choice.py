"""What `lora.init: auto` (the default) starts from: quailora where the checkpoint stores
statistics that suit it, zero elsewhere. The bases `qalora quantize` makes store them, and on
them quailora ended below zero init after fine-tuning on every seed and bit width measured
(docs/BENCHMARKS.md, "QuAILoRA initialization"); any other base (another tool's GPTQ
checkpoint, `output.init_stats: false`) still fine-tunes with no extra step. auto never takes
the slow fallback (recomputing the statistics from the original model): an explicit
`lora.init=quailora` does."""

from __future__ import annotations

from pathlib import Path

from .init_stats import STATS_NAME, inputs_label, quantize_record, stored_inputs

CHOSEN = ("zero", "svd", "quailora")


def auto_init(finetune_method: str, base_dir: Path, resumed_state: dict | None = None) -> tuple[str, str | None]:
    """-> (the init `auto` stands for, why; None: no choice made, the baselines start from
    PEFT's B = 0). `resumed_state`: the trainer state of the checkpoint a --resume continues,
    whose adapters are already initialized: its init stands."""
    if finetune_method != "qalora":
        return "zero", None
    recorded = ((resumed_state or {}).get("lora") or {}).get("init")
    if recorded in CHOSEN:
        return recorded, "the init of the run resumed"
    if not (base_dir / STATS_NAME).is_file():
        return "zero", f"'{base_dir}' stores no {STATS_NAME}"
    inputs = stored_inputs(base_dir)
    target = quantize_record(base_dir).get("target")
    if inputs == inputs_label(None) and target not in (None, "local"):
        # statistics of the quantized model's own inputs aim each layer back at its own weight,
        # undoing what a GPTAQ base compensated (README, lora.init)
        return "zero", ("its statistics were taken on the quantized model's inputs, which would undo what "
                        f"quantize.target {target} compensated")
    return "quailora", f"'{base_dir}' stores statistics that fit it ({inputs or 'inputs not recorded'})"

