"""The memory of `qalora finetune` with finetune.method lora or qlora (train/trainees.PeftTrainee,
lora/peft_models.py): PEFT LoRA on the model section's float model, held in 16 bits (bf16; fp16
when train.mixed_precision is fp16) whatever the device.

- lora: models/loading.load_model reads the model in 16 bits on the CPU (a GGUF dequantized
  tensor by tensor), then it moves to the training device.
- qlora: transformers loads it with bitsandbytes (NF4, double quantization, compute in the 16-bit
  type) straight onto the training device, quantizing each linear layer of the blocks as it is
  read; the output layer, embeddings and norms stay 16-bit. A GGUF source goes through a 16-bit
  copy saved to a temporary folder first (transformers puts no quantizer on a GGUF load).

PEFT's adapters A [rank, in] and B [out, rank] are float32 on every linear layer of the blocks
(lora.targets all-linear; fewer targets need less). The training step and the evaluation are
QA-LoRA's (finetune_plan.device_phases) with this model and these adapters."""

from __future__ import annotations

from ..config.schema import RunConfig
from ..train.precision import runs_half
from .activations import AdapterInputs, Precision, dropout_mask_bytes
from .budget import Phase, StagePlan
from .devices import planned_device
from .finetune_plan import Trainee, adapter_params, batch_settings, device_phases
from .float_model import add_float_model, saved_shard_bytes
from .quantized_bytes import nf4_model_bytes
from .runtime import add_allocator_margin, add_gpu_context, add_runtime
from .shapes import ModelShape

HALF = 2  # bytes of the 16-bit type the base is held in (bf16 or fp16)
LORA_GROUP = 1  # PEFT's A reads every input column: adapter_params and AdapterInputs with groups of 1


def plan_peft_finetune(cfg: RunConfig, shape: ModelShape) -> StagePlan:
    method, dev = cfg.finetune.method, planned_device(cfg.train.device)
    runtime = f"finetune {method}"
    trainee = peft_trainee(cfg, shape, dev)
    phases = [*base_load_phases(method, shape, dev, runtime), *device_phases(cfg, shape, dev, trainee)]
    add_allocator_margin(phases)
    half = "float16" if cfg.train.mixed_precision == "fp16" else "bfloat16"
    what = (f"LoRA rank {cfg.lora.rank} on the {half} model" if method == "lora" else
            f"QLoRA (NF4, double quant) rank {cfg.lora.rank}, {half} compute")
    return StagePlan("finetune", shape.source, f"{what}, {batch_settings(cfg)}, on {dev}", phases)


def autocast_on(cfg: RunConfig, dev: str) -> bool:
    """recipes/finetune._mixed_precision: auto is bf16/fp16 on CUDA, bf16 on a CPU with native bf16, no
    elsewhere (train/precision.py)."""
    return runs_half(cfg.train.mixed_precision, dev)


def peft_model_bytes(method: str, shape: ModelShape) -> int:
    """The model as the method holds it: all of it 16-bit (lora), or its blocks' linear layers in NF4 (qlora)."""
    if method == "lora":
        return shape.total_params * HALF
    return nf4_model_bytes(shape, HALF) + shape.float_params * HALF


def peft_trainee(cfg: RunConfig, shape: ModelShape, dev: str) -> Trainee:
    method, autocast = cfg.finetune.method, autocast_on(cfg, dev)
    # PEFT casts an adapter's input to the adapters' float32 before dropout; its bitsandbytes layer
    # skips the cast when CUDA autocast is on (peft/tuners/lora: torch.is_autocast_enabled() is CUDA's)
    dropped = HALF if method == "qlora" and dev == "cuda" and autocast else 4
    # autocast runs A and B in the 16-bit type, keeping 16-bit copies of their inputs; without it they run in float32
    kept = HALF if autocast else 4
    adapters = AdapterInputs(LORA_GROUP, kept, dropout_mask_bytes(cfg.lora.dropout, dev, dropped))
    label = ("16-bit model" if method == "lora" else "NF4 linear layers, 16-bit embeddings/norms/head")
    return Trainee(f"finetune {method}", label, peft_model_bytes(method, shape),
                   adapter_params(shape, cfg.lora.rank, LORA_GROUP), Precision(model=HALF, compute=HALF), adapters,
                   "NF4 weight dequantized for the largest layer's matmul", nf4_dequant_bytes(method, shape),
                   autocast_copies=autocast)


def nf4_dequant_bytes(method: str, shape: ModelShape) -> int:
    """bitsandbytes dequantizes a Linear4bit's weight into the 16-bit type for each matmul (forward
    and backward; its native CPU kernel and its CUDA kernel alike)."""
    return HALF * shape.largest(lambda lin: lin.weights).weights if method == "qlora" else 0


def base_load_phases(method: str, shape: ModelShape, dev: str, runtime: str) -> list[Phase]:
    """lora/peft_models.load_float_base for `method`."""
    if method == "lora":
        return [_half_load(shape, runtime, "loading the 16-bit model")]
    phases = [_half_load(shape, runtime, "loading the 16-bit model, saved for bitsandbytes")] if shape.gguf else []
    return phases + [_nf4_load(shape, dev, runtime)]


def _half_load(shape: ModelShape, runtime: str, name: str) -> Phase:
    return add_float_model(add_runtime(Phase(name), runtime), shape, HALF, "16-bit model")


def _nf4_load(shape: ModelShape, dev: str, runtime: str) -> Phase:
    """transformers' bitsandbytes loader: each linear weight read in the 16-bit type and quantized
    on the device, the rest kept 16-bit. On the CPU bitsandbytes quantizes with torch: the 16-bit
    weight, its float32 copy, the scaled float32 blocks and their int32 codes at once (14 bytes a
    weight); its CUDA kernel writes the codes from the 16-bit weight."""
    p = add_gpu_context(add_runtime(Phase("loading the model in NF4"), runtime), dev)
    p.add("NF4 linear layers, 16-bit embeddings/norms/head", dev, peft_model_bytes("qlora", shape))
    work = (HALF if dev == "cuda" else 14) * shape.largest(lambda lin: lin.weights).weights
    p.add("the largest layer's weight while it is quantized", dev, work)
    # every linear weight is read from the mapped file to be quantized, whatever its dtype: the
    # pages stay resident until the file is closed (a GGUF source: the 16-bit copy's file)
    if shape.gguf:
        return p.add("the 16-bit copy's largest file, mapped while read", "cpu", saved_shard_bytes(shape, HALF))
    return p.add("largest weight file's pages, mapped while read", "cpu", shape.largest_file_bytes)
