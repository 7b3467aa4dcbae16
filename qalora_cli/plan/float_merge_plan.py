"""The memory of `qalora merge --format float` (export/float_merge.py): a lora or qlora (PEFT)
adapter merged into the float model it was trained from, saved in that model's dtype, verified.

- merging, on the CPU: lora/peft_models.load_float_base reads the model in float32; PEFT attaches
  the adapter and merge_and_unload adds (alpha/r) B A to one weight at a time; the model is cast
  to the model section's dtype (tensor by tensor) and saved.
- verification (merge.verify), on merge.device, one model at a time, each freed before the next
  loads (read on the CPU, then moved): the merged folder read back in float32; the float32 model
  with the adapter attached unmerged; for a qlora adapter, the model as trained (NF4 + adapter,
  loaded as the finetune loads it). Each runs the probe; the merged model's logits are kept to
  the end, beside each later model's."""

from __future__ import annotations

from ..config.schema import RunConfig
from .budget import Phase, StagePlan
from .devices import DTYPE_BYTES, planned_device
from .finetune_plan import adapter_params
from .float_model import add_float_model, saved_shard_bytes
from .merge_plan import add_probe_logits, add_probe_outputs
from .peft_plan import LORA_GROUP, base_load_phases, nf4_dequant_bytes, peft_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape

RUNTIME = "merge float"


def plan_float_merge(cfg: RunConfig, shape: ModelShape, method: str, rank: int, dtype: str) -> StagePlan:
    """`method` and `rank`: the adapter's; `dtype`: its model section's, which the output is saved in."""
    m = cfg.merge
    dev = planned_device(m.device) if m.verify else "cpu"
    adapter = 4 * adapter_params(shape, rank, LORA_GROUP)
    phases = [add_float_model(add_runtime(Phase("loading the float model"), RUNTIME), shape, 4, "float32 model"),
              _merging(shape, adapter, DTYPE_BYTES[dtype])]
    if m.verify:
        phases += _verification(cfg, shape, dev, adapter, DTYPE_BYTES[dtype])
        if method == "qlora":
            phases += _trained_model(cfg, shape, dev, adapter)
    settings = (f"format float: the {method} adapter (rank {rank}) merged into the {dtype} model, "
                + (f"verified on {dev}" if m.verify else "not verified"))
    return StagePlan("merge", shape.source, settings, add_allocator_margin(phases))


def _merging(shape: ModelShape, adapter: int, out_bytes: int) -> Phase:
    p = add_runtime(Phase("merging and saving"), RUNTIME)
    p.add("float32 model", "cpu", shape.total_params * 4)
    p.add("adapter (float32)", "cpu", adapter)
    largest = shape.largest(lambda lin: lin.weights).weights
    # PEFT's delta weight: B @ A, then its copy scaled by alpha / r, both float32 and full size
    p.add("the largest layer's B A and its scaled copy (float32)", "cpu", 2 * largest * 4)
    if out_bytes < 4:  # Module.to casts one tensor at a time; the largest is the embedding
        p.add("the largest tensor cast to the model's dtype", "cpu",
              max(largest, shape.vocab * shape.hidden) * out_bytes)
    return p


def _verification(cfg: RunConfig, shape: ModelShape, dev: str, adapter: int, out_bytes: int) -> list[Phase]:
    """The merged folder (float32, converted from the saved dtype while its file is mapped), then
    the float32 model with the adapter unmerged (the merged model's logits kept meanwhile)."""
    merged = add_runtime(Phase("reading the merged folder back"), RUNTIME)
    merged.add("merged model in float32", "cpu", shape.total_params * 4)
    if out_bytes != 4:  # in float32 the model's tensors are the mapped pages themselves
        merged.add("the merged folder's largest file, mapped while converted", "cpu",
                   saved_shard_bytes(shape, out_bytes))
    probe = _probe("probing the merged model", cfg, shape, dev, 1, ("merged model in float32", shape.total_params * 4))
    unmerged = add_float_model(add_runtime(Phase("loading the float model again"), RUNTIME), shape, 4,
                               "float32 model")
    add_probe_logits(unmerged, cfg, shape, models=1)
    reference = _probe("probing the float model + adapter, unmerged", cfg, shape, dev, 2,
                       ("float32 model", shape.total_params * 4), ("adapter (float32)", adapter))
    return [merged, probe, unmerged, reference]


def _trained_model(cfg: RunConfig, shape: ModelShape, dev: str, adapter: int) -> list[Phase]:
    """A qlora adapter's model as trained (lora/peft_models.load_peft_adapter_model): NF4 + adapter."""
    loads = base_load_phases("qlora", shape, dev, RUNTIME)
    for p in loads:
        add_probe_logits(p, cfg, shape, models=1)
    probe = _probe("probing the NF4 model + adapter, as trained", cfg, shape, dev, 2,
                   ("NF4 linear layers, 16-bit embeddings/norms/head", peft_model_bytes("qlora", shape)),
                   ("adapter (float32)", adapter),
                   ("NF4 weight dequantized for the largest layer's matmul", nf4_dequant_bytes("qlora", shape)))
    return loads + [probe]


def _probe(name: str, cfg: RunConfig, shape: ModelShape, dev: str, models: int, *held: tuple[str, int]) -> Phase:
    """A model (`held`: its parts) running the probe on `dev`, `models` models' logits held."""
    p = add_gpu_context(add_runtime(Phase(name), RUNTIME), dev)
    for label, nbytes in held:
        p.add(label, dev, nbytes)
    return add_probe_outputs(p, cfg, shape, dev, models)
