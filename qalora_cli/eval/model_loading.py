"""Load a model to evaluate or generate with, of every kind qalora reads: a Hugging Face folder,
a hub id or a .gguf file (unquantized, or dequantized at load), a GPTQ checkpoint, one with a
qalora adapter on it, a merged export (qalora or gptq format), and a PEFT adapter trained by
`finetune.method: qlora | lora` (its base named in qalora_base.json). An MLX export is refused
with the runtime that runs it.

Nothing heavy is imported at module level: the CLI imports the help texts from here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError

DTYPE_HELP = "auto (float32 on CPU, float16 on a GPU), float32, float16 or bfloat16"
KERNEL_HELP = ("the quantized layers' kernel: auto (triton on CUDA, else torch), torch (the reference), triton, "
               "gptqmodel (the peer's kernels, GPTQ checkpoints)")
MODEL_HELP = ("a qalora GPTQ or merged checkpoint folder (qalora or gptq format), a Hugging Face folder, a .gguf "
              "file or a hub id (with --adapter: its base)")
ADAPTER_HELP = ("a qalora adapter folder (put on the GPTQ checkpoint --model) or a qlora/lora run's PEFT adapter "
                "folder (its base is read from qalora_base.json)")


def load_eval_model(model: str | None, adapter: str | Path | None, device: str = "auto", dtype: str = "auto",
                    kernel: str = "auto"):
    """-> (model in eval mode, tokenizer, a name for the report). The chosen kernels are
    printed to stderr."""
    from ..device import resolve_device
    from ..lora.peft_models import is_peft_adapter

    if model is None and adapter is None:
        raise UserError("give --model (a GPTQ or merged checkpoint, a Hugging Face folder, a .gguf file or a hub id)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if adapter is not None and is_peft_adapter(adapter):
        return _load_peft(model, Path(adapter), dev, torch_dtype, kernel)
    config = tensors = None
    if adapter is not None:
        from ..lora.adapter_io import read_adapter

        config, tensors = read_adapter(Path(adapter))
        model = model or config["base"]["path"]
    path = Path(model).expanduser()
    refuse_mlx(path)
    if path.is_dir() and is_quantized_folder(path):
        loaded, tokenizer = _load_quantized(path, config, tensors, dev, torch_dtype, kernel)
        return loaded, tokenizer, f"{path}" + (f" + adapter {adapter}" if adapter else "")
    if kernel not in ("auto", "torch"):
        raise UserError(f"--kernel {kernel}: '{model}' is not a quantized checkpoint; kernels apply to quantized "
                        "layers")
    if config is not None:
        raise UserError(f"--adapter needs --model to be the GPTQ checkpoint it was trained on; '{model}' is not a "
                        "GPTQ checkpoint folder")
    return _load_float(model, dev, torch_dtype)


def resolve_dtype(dtype: str, dev):
    """'auto' is float32 on a CPU (half precision is slow there) and float16 on an accelerator."""
    import torch

    from ..dtypes import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use {DTYPE_HELP}")
    return DTYPES[dtype] if dtype != "auto" else torch.float32 if dev.type == "cpu" else torch.float16


def is_quantized_folder(path: Path) -> bool:
    """A GPTQ checkpoint or a merged (qalora-format) one: both load with load_quantized."""
    from ..models.quantized_io import MERGED_QUANT_METHOD, quant_method_of, read_model_config

    try:
        config = read_model_config(path)
    except UserError:
        return False
    return quant_method_of(config) in ("gptq", MERGED_QUANT_METHOD)


def refuse_mlx(path: Path) -> None:
    """An MLX export (`qalora merge --format mlx`) holds MLX's own packing, which torch does not
    run: say which runtime does, rather than fail inside transformers."""
    config = path / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # the loader gives its own message
    if isinstance(data, dict) and "quantization" in data and "quantization_config" not in data:
        raise UserError(f"'{path}' is an MLX model (mlx-lm's quantization): run it with mlx-lm, e.g. "
                        f"python -m mlx_lm generate --model {path} --prompt ...")


def _load_quantized(path: Path, config, tensors, dev, torch_dtype, kernel: str):
    """A GPTQ or merged checkpoint, with the qalora adapter `config`/`tensors` on it if given."""
    from ..kernels.registry import use_backend
    from ..kernels.torch_quant_linear import cache_inference_weights
    from ..lora.adapter_io import attach_adapter, check_base
    from ..models.loading import load_tokenizer
    from ..models.quantized_io import load_quantized

    if config is not None:  # before the weights load: a wrong base fails at once
        check_base(config, path)
    loaded, _ = load_quantized(path, dev, torch_dtype)
    tokenizer = load_tokenizer(path)
    if config is not None:
        attach_adapter(loaded, config, tensors)
        loaded.to(dev)
    chosen = use_backend(loaded, kernel, torch_dtype)
    if kernel != "auto" or set(chosen.chosen) != {"torch"}:  # the plain CPU case goes unsaid
        print(chosen.summary(), file=sys.stderr)
    cache_inference_weights(loaded, torch_dtype)  # torch layers would rebuild every weight per batch
    return loaded.eval(), tokenizer


def _load_float(model: str, dev, torch_dtype):
    """A Hugging Face folder, a hub id or a .gguf file, through transformers."""
    from ..config.schema import ModelSection
    from ..dtypes import DTYPES
    from ..models.loading import load_model

    dtype_name = {v: k for k, v in DTYPES.items()}[torch_dtype]
    loaded, tokenizer, src = load_model(ModelSection(name_or_path=model, dtype=dtype_name), str(dev))
    return loaded, tokenizer, src.describe()


# ---- PEFT adapters (finetune.method qlora | lora) ------------------------------------------------

def _check_peft_base(model: str, adapter: Path, recorded, base_sha256: str) -> None:
    """--model, when given with a PEFT adapter, must be the base qalora_base.json names: the same
    folder or hub id, or files of the same SHA-256 (the identity the run recorded)."""
    from ..config.schema import ModelSection
    from ..lora.peft_models import BASE_FILE, source_sha256

    if recorded.name_or_path == model or _same_path(model, recorded.name_or_path):
        return
    if Path(model).expanduser().exists() and source_sha256(ModelSection(name_or_path=model)) == base_sha256:
        return
    raise UserError(f"'{adapter}' was trained on '{recorded.name_or_path}' ({BASE_FILE}), not on '{model}': "
                    "omit --model or give that base")


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _load_peft(model: str | None, adapter: Path, dev, torch_dtype, kernel: str):
    """The base rebuilt as qalora_base.json says (16-bit, or NF4 for qlora), the adapter on it."""
    from ..lora.peft_models import load_peft_adapter_model, read_base_record

    record, base = read_base_record(adapter)  # a damaged folder fails before any weights load
    if model is not None:
        _check_peft_base(model, adapter, base, record["base_sha256"])
    if kernel not in ("auto", "torch"):
        raise UserError(f"--kernel {kernel}: a {record['method']} adapter's base holds no GPTQ layers; kernels "
                        "apply to quantized layers")
    peft_model, tokenizer = load_peft_adapter_model(adapter, dev, torch_dtype)
    # PEFT injects its LoRA layers into the transformers model itself: that model runs with the
    # adapter on, and is what the MMLU, perplexity and attention-sink code expect (the wrapper
    # hides e.g. model.model.rotary_emb).
    loaded = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    return loaded.eval(), tokenizer, f"{base.name_or_path} + {record['method']} adapter {adapter}"
