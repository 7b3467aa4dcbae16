"""The memory of `qalora merge` (recipes/merge.py, export/, export/verify.py).

The merge itself streams: one tensor of the base is read, changed (a layer's zero points) and
written at a time. Verification then loads the unmerged model (base + adapter, float32) and
the merged output one after the other, never together, and runs the same probe on each: the
peak is one float32-scaled quantized model with its probe outputs."""

from __future__ import annotations

from ..config.schema import RunConfig
from .budget import Phase, StagePlan
from .devices import planned_device
from .finetune_plan import adapter_params, load_phase
from .quantized_bytes import float_part_bytes, packed_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape

# export/verify.run_probe keeps every layer's rebuilt float32 weight when they fit in this
# (kernels/torch_quant_linear.cache_inference_weights)
WEIGHT_CACHE_BUDGET = 4 << 30
PPL_BATCH, PPL_SEQ = 4, 256  # export/verify.py: perplexity in 4 windows of 256 tokens at a time


def plan_merge(cfg: RunConfig, shape: ModelShape, bits: int, group_size: int, rank: int) -> StagePlan:
    m = cfg.merge
    dev = planned_device(m.device) if m.verify else "cpu"
    phases = [_stream(shape, bits, rank, group_size)]
    notes = []
    if m.verify:
        # the merged model's float zeros: the larger of the two models verification loads
        packed = packed_model_bytes(shape, bits, group_size, 4, float_zeros=True)
        phases += [load_phase("merge", cfg, shape, bits, group_size, packed),
                   _verify(cfg, shape, dev, packed + float_part_bytes(shape, 4), rank, group_size)]
    if m.verify and m.format == "gguf":
        phases.append(_gguf_reload(cfg, shape, dev))
    if m.format == "mlx":
        notes.append("merge.format mlx: mlx-lm probes the output in its own memory, not counted here")
    if m.format == "gptq" and m.rounding != "nearest":
        notes.append(f"merge.rounding {m.rounding} refits each layer on calibration inputs first; that refit "
                     "is not in this plan")
    settings = f"format {m.format}, INT{bits} g{group_size}, adapter rank {rank}, " + \
        (f"verified on {dev}" if m.verify else "not verified")
    return StagePlan("merge", shape.source, settings, add_allocator_margin(phases), notes)


def _stream(shape: ModelShape, bits: int, rank: int, group_size: int) -> Phase:
    p = add_runtime(Phase("streamed merge"), "merge")
    # the embedding (float16) or the largest packed qweight, whichever is bigger
    largest = max(shape.vocab * shape.hidden * 2, shape.largest(lambda lin: lin.weights).weights * bits // 8)
    p.add("largest stored tensor, read and written", "cpu", 2 * largest)
    p.add("adapter (float32)", "cpu", 4 * adapter_params(shape, rank, group_size))
    return p


def _verify(cfg: RunConfig, shape: ModelShape, dev: str, model: int, rank: int, group_size: int) -> Phase:
    p = add_gpu_context(add_runtime(Phase("verification"), "merge"), dev)
    p.add("unmerged or merged model (float32 scales, zeros, embeddings)", dev, model)
    p.add("adapter (float32)", dev, 4 * adapter_params(shape, rank, group_size))
    dense = shape.linear_weights * 4
    p.add("every layer's rebuilt float32 weight, kept while probing (when under 4 GiB)", dev,
          dense if dense <= WEIGHT_CACHE_BUDGET else 0)
    return add_probe_outputs(p, cfg, shape, dev, models=2)  # the unmerged model's kept, the merged one's


def add_probe_logits(p: Phase, cfg: RunConfig, shape: ModelShape, models: int) -> Phase:
    """export/verify.run_probe's logits of every prompt position (float32, on the CPU) for
    `models` models: the first model's are kept while the next one runs."""
    m = cfg.merge
    what = "both models" if models == 2 else "one model"
    return p.add(f"probe logits ({m.verify_prompts} prompts x {m.verify_tokens} tokens, {what})", "cpu",
                 models * m.verify_prompts * m.verify_tokens * shape.vocab * 4)


def add_probe_outputs(p: Phase, cfg: RunConfig, shape: ModelShape, dev: str, models: int) -> Phase:
    """The probe's logits, and its perplexity's on `dev`: eval/perplexity.py makes a batch's logits
    while the last batch's are still held, then one row's log-softmax."""
    add_probe_logits(p, cfg, shape, models)
    if cfg.merge.ppl_tokens:
        p.add(f"perplexity logits (2 batches of {PPL_BATCH} x {PPL_SEQ} tokens) and one row's log-softmax", dev,
              (2 * PPL_BATCH + 1) * PPL_SEQ * shape.vocab * 4)
    return p


def _gguf_reload(cfg: RunConfig, shape: ModelShape, dev: str) -> Phase:
    """merge --format gguf is verified on the GGUF as its users load it: transformers dequantizes
    it into a float32 model (recipes/merge.load_merged)."""
    p = add_gpu_context(add_runtime(Phase("verification of the GGUF"), "merge"), dev)
    # Q4_1: 32 weights in 16 bytes of codes plus a float16 scale and minimum
    p.add("merged GGUF file, mapped while read", "cpu", shape.linear_weights * 20 // 32 + shape.float_params * 2)
    p.add("GGUF dequantized to a float32 model", dev, shape.total_params * 4)
    p.add("largest tensor dequantized to float32", "cpu", shape.vocab * shape.hidden * 4)
    return add_probe_outputs(p, cfg, shape, dev, models=2)
