"""The memory of `qalora finetune` (finetune.method qalora: recipes/finetune.py, train/, lora/);
the training and evaluation phases are every method's (lora and qlora: peft_plan.py).

The quantized model sits on the training device as packed buffers, with the float parts
(embeddings, norms, output layer) in the model's type: float32 on the CPU, where autocast
computes in bf16, and the half type on a GPU. The peak is the end of a micro-batch's forward
pass (every block's saved activations plus the loss over the vocabulary) or the evaluation's
forward on twice as many rows; the plan assumes full micro-batches: every sequence
data.max_length tokens long and labelled (packed data), fewer labelled tokens need less."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config.schema import RunConfig
from ..errors import UserError
from ..train.precision import runs_half
from .activations import (AdapterInputs, Precision, block_saved_per_token, boundary_per_token,
                          dropout_mask_bytes, logits_bytes)
from .budget import Phase, StagePlan
from .devices import planned_device
from .quantized_bytes import float_part_bytes, groups_of, packed_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape


@dataclass(frozen=True)
class Trainee:
    """What a finetune.method puts on the training device, as the training and evaluation phases
    count it (the loop, loss and evaluation are the same for every method: train/loop.py)."""
    runtime: str          # its key in plan/runtime.py
    model_label: str
    model_bytes: int
    adapter_params: int   # float32 A and B of every adapter
    precision: Precision
    adapters: AdapterInputs  # what each adapter keeps in training (dropout on)
    weight_work_label: str
    weight_work: int      # a frozen layer's weight rebuilt for its matmul (the largest layer's)
    autocast_copies: bool = False  # autocast caches 16-bit copies of the adapters (nn.Linear under autocast)


def precision(cfg: RunConfig, dev: str) -> Precision:
    """recipes/finetune: float32 model on the CPU (bf16 autocast when mixed_precision resolves to bf16);
    on a GPU the model is held in the mixed-precision type."""
    half = 2 if runs_half(cfg.train.mixed_precision, dev) else None
    if dev == "cpu":
        return Precision(model=4, compute=half or 4)
    return Precision(model=half or 4, compute=half or 4)


def plan_finetune(cfg: RunConfig, shape: ModelShape, bits: int, group_size: int) -> StagePlan:
    dev = planned_device(cfg.train.device)
    trainee = _qalora_trainee(cfg, shape, dev, bits, group_size)
    phases = [_load(cfg, shape, bits, group_size, trainee.precision), *device_phases(cfg, shape, dev, trainee)]
    add_allocator_margin(phases)
    settings = (f"QA-LoRA rank {cfg.lora.rank} on INT{bits} g{group_size}, " + batch_settings(cfg) + f", on {dev}")
    return StagePlan("finetune", shape.source, settings, phases)


def batch_settings(cfg: RunConfig) -> str:
    t = cfg.train
    return (f"micro-batch {t.micro_batch_size} x {cfg.data.max_length} tokens, gradient checkpointing "
            f"{'on' if t.gradient_checkpointing else 'off'}")


def device_phases(cfg: RunConfig, shape: ModelShape, dev: str, trainee: Trainee) -> list[Phase]:
    """The training step and the held-out evaluation, for any method."""
    return [_training(cfg, shape, dev, trainee), _evaluation(cfg, shape, dev, trainee)]


def _qalora_trainee(cfg: RunConfig, shape: ModelShape, dev: str, bits: int, group_size: int) -> Trainee:
    p = precision(cfg, dev)
    model = packed_model_bytes(shape, bits, group_size, p.model) + float_part_bytes(shape, p.model)
    # the pooled input is in the model's type (its dropout's noise too); autocast casts it for A
    adapters = AdapterInputs(group_size, p.compute, dropout_mask_bytes(cfg.lora.dropout, dev, p.model))
    return Trainee("finetune", "quantized model (packed layers, float embeddings/norms/head)", model,
                   adapter_params(shape, cfg.lora.rank, group_size), p, adapters,
                   "weight rebuilt for the largest layer's matmul (torch kernel)", _rebuilt_weight(cfg, shape, dev))


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
    """A [rank, groups] and B [out, rank] of every quantized layer (lora/qalora_linear.py); with
    group_size 1, PEFT LoRA's A [rank, in] and B [out, rank]."""
    return sum(rank * groups_of(lin, group_size) + lin.out_features * rank for lin in shape.linears())


def _device_base(trainee: Trainee, dev: str, name: str) -> Phase:
    ph = add_gpu_context(add_runtime(Phase(name), trainee.runtime), dev)
    ph.add(trainee.model_label, dev, trainee.model_bytes)
    return ph


def _rebuilt_weight(cfg: RunConfig, shape: ModelShape, dev: str) -> int:
    """The torch kernel rebuilds a layer's weight for each matmul (int32 codes, float32, the
    compute type: about 18 bytes a weight); the fused Triton kernel (auto on CUDA) builds none."""
    fused = cfg.train.kernel == "triton" or (cfg.train.kernel == "auto" and dev == "cuda")
    return 0 if fused else 18 * shape.largest(lambda lin: lin.weights).weights


def _training(cfg: RunConfig, shape: ModelShape, dev: str, trainee: Trainee) -> Phase:
    t, p, params = cfg.train, trainee.precision, trainee.adapter_params
    tokens = t.micro_batch_size * cfg.data.max_length
    ph = _device_base(trainee, dev, "training step")
    ph.add(f"adapters, gradients, AdamW states ({params / 1e6:.3g}M parameters, float32)", dev, 16 * params)
    ph.add("the adapters' 16-bit copies, cached by autocast", dev, 2 * params if trainee.autocast_copies else 0)
    per_block = block_saved_per_token(shape, p, cfg.lora.rank, trainee.adapters)
    if t.gradient_checkpointing:
        ph.add(f"block inputs kept for recomputation ({tokens} tokens)", dev,
               tokens * shape.layers * boundary_per_token(shape, p))
        ph.add("one block's activations, recomputed", dev, tokens * per_block)
    else:
        ph.add(f"activations kept for backward ({tokens} tokens x {shape.layers} blocks)", dev,
               tokens * shape.layers * per_block)
    ph.add(f"logits and loss over the vocabulary ({tokens} x {shape.vocab})", dev,
           logits_bytes(tokens, shape.vocab, p, training=True))
    ph.add(trainee.weight_work_label, dev, trainee.weight_work)
    return ph


def _evaluation(cfg: RunConfig, shape: ModelShape, dev: str, trainee: Trainee) -> Phase:
    """train/loop.evaluate: no gradients, no dropout, 2 x micro_batch_size rows per forward."""
    p = trainee.precision
    tokens = 2 * cfg.train.micro_batch_size * cfg.data.max_length
    ph = _device_base(trainee, dev, "held-out evaluation")
    ph.add("adapters and AdamW states", dev, 12 * trainee.adapter_params)
    ph.add(f"logits and loss over the vocabulary ({tokens} x {shape.vocab})", dev,
           logits_bytes(tokens, shape.vocab, p, training=False))
    ph.add("one block's activations", dev,
           tokens * block_saved_per_token(shape, p, cfg.lora.rank, replace(trainee.adapters, mask=0)))
    ph.add(trainee.weight_work_label, dev, trainee.weight_work)
    return ph
