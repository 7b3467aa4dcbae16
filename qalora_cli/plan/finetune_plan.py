"""The memory of `qalora finetune` (finetune.method qalora: recipes/finetune.py, train/, lora/).

The quantized model sits on the training device as packed buffers, with the float parts
(embeddings, norms, output layer) in the model's type: float32 on the CPU, where autocast
computes in bf16, and the half type on a GPU. The peak is the end of a micro-batch's forward
pass (every block's saved activations plus the loss over the vocabulary) or the evaluation's
forward on twice as many rows; the plan assumes full micro-batches: every sequence
data.max_length tokens long and labelled (packed data), fewer labelled tokens need less."""

from __future__ import annotations

from ..config.schema import RunConfig
from ..errors import UserError
from .activations import Precision, block_saved_per_token, boundary_per_token, logits_bytes
from .budget import Phase, StagePlan
from .devices import planned_device
from .quantized_bytes import float_part_bytes, groups_of, packed_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape


def precision(cfg: RunConfig, dev: str) -> Precision:
    """recipes/finetune: float32 model on the CPU (bf16 autocast unless mixed_precision no); on a
    GPU the model is held in the mixed-precision type."""
    mp = cfg.train.mixed_precision
    half = 2 if mp in ("auto", "bf16", "fp16") else None
    if dev == "cpu":
        return Precision(model=4, compute=half or 4)
    return Precision(model=half or 4, compute=half or 4)


def plan_finetune(cfg: RunConfig, shape: ModelShape, bits: int, group_size: int) -> StagePlan:
    t, d = cfg.train, cfg.data
    dev = planned_device(t.device)
    p = precision(cfg, dev)
    model = packed_model_bytes(shape, bits, group_size, p.model) + float_part_bytes(shape, p.model)
    phases = [_load(cfg, shape, bits, group_size, p), _training(cfg, shape, dev, p, model, group_size),
              _evaluation(cfg, shape, dev, p, model, group_size)]
    add_allocator_margin(phases)
    settings = (f"QA-LoRA rank {cfg.lora.rank} on INT{bits} g{group_size}, micro-batch {t.micro_batch_size} x "
                f"{d.max_length} tokens, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, "
                f"on {dev}")
    return StagePlan("finetune", shape.source, settings, phases)


def checkpoint_bytes(shape: ModelShape, bits: int, group_size: int) -> int:
    """The stored checkpoint (float16 scales and float parts), from its files when they exist."""
    return shape.weight_file_bytes or packed_model_bytes(shape, bits, group_size, 2) + float_part_bytes(shape, 2)


def shard_bytes(max_shard_size: str) -> int:
    """output.max_shard_size ("4GB", "500MB", "2GiB") in bytes, as transformers reads it."""
    text = max_shard_size.strip().upper()
    try:
        for unit, size in (("GIB", 1 << 30), ("MIB", 1 << 20), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * size)
        return int(text)
    except ValueError:
        raise UserError(f"output.max_shard_size '{max_shard_size}' is not a size such as 4GB or 500MB") from None


def load_phase(stage: str, cfg: RunConfig, shape: ModelShape, bits: int, group_size: int, model_bytes: int) -> Phase:
    """models/quantized_io.load_quantized on the CPU: the packed layers are built empty (zeroed),
    every stored tensor is read while its file (one shard at a time) is mapped, then the model
    moves to its device and type."""
    ckpt = checkpoint_bytes(shape, bits, group_size)
    shard = shape.largest_file_bytes or min(ckpt, shard_bytes(cfg.output.max_shard_size))
    p = add_runtime(Phase("loading the quantized model"), stage)
    p.add("packed layers built empty", "cpu", model_bytes)
    p.add("checkpoint tensors read", "cpu", ckpt)
    p.add("largest checkpoint file's pages, mapped while read", "cpu", shard)
    return p


def _load(cfg: RunConfig, shape: ModelShape, bits: int, group_size: int, p: Precision) -> Phase:
    return load_phase("finetune", cfg, shape, bits, group_size, packed_model_bytes(shape, bits, group_size, p.model))


def adapter_params(shape: ModelShape, rank: int, group_size: int) -> int:
    """A [rank, groups] and B [out, rank] of every quantized layer (lora/qalora_linear.py)."""
    return sum(rank * groups_of(lin, group_size) + lin.out_features * rank for lin in shape.linears())


def _device_base(cfg: RunConfig, shape: ModelShape, dev: str, model: int, name: str) -> Phase:
    ph = add_gpu_context(add_runtime(Phase(name), "finetune"), dev)
    ph.add("quantized model (packed layers, float embeddings/norms/head)", dev, model)
    return ph


def _rebuilt_weight(cfg: RunConfig, shape: ModelShape, dev: str) -> int:
    """The torch kernel rebuilds a layer's weight for each matmul (int32 codes, float32, the
    compute type: about 18 bytes a weight); the fused Triton kernel (auto on CUDA) builds none."""
    fused = cfg.train.kernel == "triton" or (cfg.train.kernel == "auto" and dev == "cuda")
    return 0 if fused else 18 * shape.largest(lambda lin: lin.weights).weights


def _training(cfg: RunConfig, shape: ModelShape, dev: str, p: Precision, model: int, group_size: int) -> Phase:
    t, lora = cfg.train, cfg.lora
    tokens = t.micro_batch_size * cfg.data.max_length
    ph = _device_base(cfg, shape, dev, model, "training step")
    params = adapter_params(shape, lora.rank, group_size)
    ph.add(f"adapters, gradients, AdamW states ({params / 1e6:.3g}M parameters, float32)", dev, 16 * params)
    per_block = block_saved_per_token(shape, p, lora.rank, group_size, lora.dropout > 0)
    if t.gradient_checkpointing:
        ph.add(f"block inputs kept for recomputation ({tokens} tokens)", dev,
               tokens * shape.layers * boundary_per_token(shape, p))
        ph.add("one block's activations, recomputed", dev, tokens * per_block)
    else:
        ph.add(f"activations kept for backward ({tokens} tokens x {shape.layers} blocks)", dev,
               tokens * shape.layers * per_block)
    ph.add(f"logits and loss over the vocabulary ({tokens} x {shape.vocab})", dev,
           logits_bytes(tokens, shape.vocab, p, training=True))
    ph.add("weight rebuilt for the largest layer's matmul (torch kernel)", dev, _rebuilt_weight(cfg, shape, dev))
    return ph


def _evaluation(cfg: RunConfig, shape: ModelShape, dev: str, p: Precision, model: int, group_size: int) -> Phase:
    """train/loop.evaluate: no gradients, 2 x micro_batch_size rows per forward."""
    t, lora = cfg.train, cfg.lora
    tokens = 2 * t.micro_batch_size * cfg.data.max_length
    ph = _device_base(cfg, shape, dev, model, "held-out evaluation")
    ph.add("adapters and AdamW states", dev, 12 * adapter_params(shape, lora.rank, group_size))
    ph.add(f"logits and loss over the vocabulary ({tokens} x {shape.vocab})", dev,
           logits_bytes(tokens, shape.vocab, p, training=False))
    ph.add("one block's activations", dev, tokens * block_saved_per_token(shape, p, lora.rank, group_size, False))
    ph.add("weight rebuilt for the largest layer's matmul (torch kernel)", dev, _rebuilt_weight(cfg, shape, dev))
    return ph
