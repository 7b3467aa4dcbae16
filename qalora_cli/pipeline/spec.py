"""The recipe file: what it may say, checked before anything runs.

    description: one line
    output: out/recipes/NAME          # every stage's output goes under it
    sweep: {bits: [4, 3, 2]}          # a stage that says {bits} (or uses one that does) runs per value
    stages:
      quantize: {run: quantize, config: smollm2-135m-int{bits}}
      qalora:   {run: finetune, config: smollm2-135m-int{bits}, model: quantize}
      merged:   {run: merge, config: smollm2-135m-int{bits}, model: quantize, adapter: qalora}
      eval:     {run: eval, config: smollm2-135m-int{bits}, model: merged, metrics: [exact_match, ppl],
                 label: QA-LoRA merged}
    results: {metrics: [exact_match, ppl, size_mb], x: bits}
"""

from __future__ import annotations

import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError

# metric -> (the stage kind that measures it, what it is); the eval row also inherits its
# ancestors' metrics (a fine-tune's tokens/s, a quantization's seconds)
METRICS = {
    "exact_match": ("eval", "held-out exact match on the config's task (greedy)"),
    "answer_loss": ("eval", "cross-entropy of the held-out answers"),
    "ppl": ("eval", "perplexity of the held-out text"),
    "mmlu": ("eval", "MMLU accuracy"),
    "size_mb": ("eval", "bytes on disk of what the evaluation loaded (model + adapter), in MB"),
    "train_tokens_per_s": ("finetune", "training tokens per second"),
    "train_peak_mib": ("finetune", "the fine-tune's peak memory"),
    "train_s": ("finetune", "the fine-tune's training seconds"),
    "eval_loss": ("finetune", "held-out loss at the end of training"),
    "quantize_s": ("quantize", "the quantization's seconds"),
    "merge_s": ("merge", "the merge's seconds"),
}
EVAL_METRICS = ("exact_match", "answer_loss", "ppl", "mmlu")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalOptions(_Strict):
    examples: int | None = Field(None, ge=1, description="records answered for exact match (default: the config's)")
    loss_examples: int | None = Field(None, ge=1, description="records the answer loss is taken on")
    ppl_tokens: int | None = Field(8192, ge=64, description="tokens of held-out text for perplexity")
    ppl_seq_len: int = Field(512, ge=16)
    mmlu_limit: int | None = Field(None, ge=1, description="questions per subject")
    mmlu_shots: int = Field(0, ge=0, le=5)
    device: str = "auto"
    dtype: str = "auto"


class StageSpec(_Strict):
    run: Literal["quantize", "finetune", "merge", "eval"]
    config: str | None = Field(None, description="a run config by name or path (templated)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides: section.key -> value (templated)")
    model: str | None = Field(None, description="a stage whose output is this stage's model, or a path")
    adapter: str | None = Field(None, description="a finetune stage, or a path")
    format: Literal["qalora", "gptq", "gguf", "mlx", "float"] | None = None
    metrics: list[str] = Field(default_factory=list, description="eval: " + ", ".join(EVAL_METRICS))
    eval: EvalOptions = Field(default_factory=EvalOptions)
    label: str | None = Field(None, description="eval: the row's name in the results (templated)")
    columns: dict[str, Any] = Field(default_factory=dict, description="eval: fixed row values, e.g. {bits: 16}")


class ResultsSpec(_Strict):
    metrics: list[str] = Field(min_length=1)
    x: str | None = Field(None, description="the sweep variable on the plot's x axis")


class RecipeSpec(_Strict):
    description: str = ""
    output: str
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    stages: dict[str, StageSpec] = Field(min_length=1)
    results: ResultsSpec


def parse_recipe(data: dict, source: str) -> RecipeSpec:
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        got = f" (got {err['input']!r})" if "input" in err and err["type"] not in ("missing", "extra_forbidden") else ""
        raise UserError(f"recipe {source}: {where}: {msg}{got}") from None
    _check(spec, source)
    return spec


def _check(spec: RecipeSpec, source: str) -> None:
    for var, values in spec.sweep.items():
        if not values:
            raise UserError(f"recipe {source}: sweep.{var} lists no values")
    for sid, st in spec.stages.items():
        where = f"recipe {source}: stage '{sid}'"
        for var in template_vars(st):
            if var not in spec.sweep:
                raise UserError(f"{where}: '{{{var}}}' is not a sweep variable (sweep: {', '.join(spec.sweep) or 'none'})")
        if st.run != "eval" and (st.metrics or st.label or st.columns):
            raise UserError(f"{where}: metrics, label and columns belong to eval stages")
        if st.run == "eval" and not st.metrics:
            raise UserError(f"{where}: an eval stage needs metrics: {', '.join(EVAL_METRICS)}")
        for m in st.metrics:
            if m not in EVAL_METRICS:
                raise UserError(f"{where}: unknown metric '{m}'; an eval stage measures {', '.join(EVAL_METRICS)}")
        if st.format and st.run != "merge":
            raise UserError(f"{where}: format belongs to merge stages")
        if st.run in ("quantize", "finetune") and st.adapter:
            raise UserError(f"{where}: a {st.run} stage takes no adapter")
        if st.run == "merge" and not st.adapter:
            raise UserError(f"{where}: a merge stage needs an adapter (a finetune stage)")
        if st.run != "eval" and not st.config:
            raise UserError(f"{where}: a {st.run} stage needs a config")
    for m in spec.results.metrics:
        if m not in METRICS:
            raise UserError(f"recipe {source}: results: unknown metric '{m}'; known: {', '.join(METRICS)}")
    if spec.results.x is not None and spec.results.x not in spec.sweep:
        raise UserError(f"recipe {source}: results.x '{spec.results.x}' is not a sweep variable")
    if not any(st.run == "eval" for st in spec.stages.values()):
        raise UserError(f"recipe {source}: no eval stage, so no results")
    stage_order(spec, source)


def references(st: StageSpec, stages: dict) -> dict[str, str]:
    """role -> stage id, for model/adapter values that name a stage (others are paths)."""
    return {role: v for role, v in (("model", st.model), ("adapter", st.adapter)) if v in stages}


def stage_order(spec: RecipeSpec, source: str) -> list[str]:
    """The stages so that each comes after the stages it uses; a cycle is refused, named."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(sid: str, path: list[str]) -> None:
        if state.get(sid) == "done":
            return
        if state.get(sid) == "open":
            cycle = path[path.index(sid):] + [sid]
            raise UserError(f"recipe {source}: the stages form a cycle: {' -> '.join(cycle)}")
        state[sid] = "open"
        for ref in references(spec.stages[sid], spec.stages).values():
            visit(ref, path + [sid])
        state[sid] = "done"
        order.append(sid)

    for sid in spec.stages:
        visit(sid, [])
    return order


def template_vars(st: StageSpec) -> set[str]:
    """The {names} a stage's text fields use."""
    texts = [st.config, st.model, st.adapter, st.label, *map(str, st.set.values()), *map(str, st.columns.values())]
    return {name for t in texts if t for _, name, _, _ in string.Formatter().parse(t) if name}


def fill(text: str | None, values: dict[str, Any]) -> str | None:
    return text.format_map(values) if text else text
