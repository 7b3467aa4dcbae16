"""The paper's baselines as PEFT models: LoRA on the float model held in 16 bits (`lora`, the
upper bound) and on the float model in bitsandbytes NF4 with double quantization (`qlora`).

A qlora/lora run folder is a standard PEFT adapter (adapter_config.json with peft_type LORA,
adapter_model.safetensors) plus `qalora_base.json`, which says how to rebuild the base:

    {"method": "qlora" | "lora",
     "base": the config's model section (package + name_or_path, a path, or a hub id),
     "dtype": the 16-bit dtype the base was held in,
     "nf4": {"double_quant": true, "compute_dtype": ..., "quant_type": "nf4"} for qlora, else null,
     "base_sha256": the source files' SHA-256 (a hub id: "hub:<id>@<revision>")}

`load_peft_adapter_model` reads it back (evaluation, the float merge); PEFT weights are read
from safetensors only, never from a pickle.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

from ..config.schema import LoraSection, ModelSection
from ..errors import UserError, first_line
from ..dtypes import DTYPES
from ..models.loading import check_tokenizer, load_model, quiet_transformers
from ..models.source import ModelSource, resolve_source

BASE_FILE = "qalora_base.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
METHODS = ("qlora", "lora")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- the base

def source_sha256(m: ModelSection) -> str:
    """The float source's identity: its weight files' bytes (a GGUF file, or a folder's
    safetensors); a hub id is named with its revision (its files are not local)."""
    src = resolve_source(m)
    if not src.is_local:
        return f"hub:{src.location}@{src.revision or 'main'}"
    folder = Path(src.location)
    files = [folder / src.gguf_file] if src.gguf_file else sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"'{folder}' holds no safetensors weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _device_map(device: torch.device) -> dict:
    return {"": device.index if device.type == "cuda" and device.index is not None else str(device)}


def _nf4_from_folder(folder: str, m: ModelSection, device: torch.device, dtype: torch.dtype,
                     compute_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=_nf4_config(compute_dtype), dtype=dtype,
                                                device_map=_device_map(device), revision=m.revision,
                                                trust_remote_code=m.trust_remote_code)


def load_float_base(m: ModelSection, device: torch.device, dtype: torch.dtype, nf4_compute: torch.dtype | None):
    """-> (model, tokenizer): the model section's float model in `dtype`, its decoder linears in
    NF4 with double quantization when `nf4_compute` is given (bitsandbytes, through transformers'
    own loader, so the quantization is exactly what `from_pretrained` gives QLoRA users)."""
    if nf4_compute is not None:
        _need_bitsandbytes()
    src = resolve_source(m)
    if nf4_compute is None or src.gguf_file:
        model, tokenizer, _ = load_model(m.model_copy(update={"dtype": DTYPE_NAMES[dtype]}), "cpu")
        if nf4_compute is None:
            return model.to(device), tokenizer
        # transformers will not put bitsandbytes on a GGUF load: go through a 16-bit HF folder
        with tempfile.TemporaryDirectory(prefix="qalora-nf4-") as tmp:
            model.save_pretrained(tmp)
            del model
            local = m.model_copy(update={"revision": None})
            return _load_or_refuse(lambda: _nf4_from_folder(tmp, local, device, dtype, nf4_compute), src), tokenizer
    model = _load_or_refuse(lambda: _nf4_from_folder(src.location, m, device, dtype, nf4_compute), src)
    return model, _tokenizer(src, m)


def _load_or_refuse(load, src: ModelSource):
    quiet_transformers()
    try:
        return load().eval()
    except Exception as e:  # the loading boundary: bitsandbytes missing a backend, damaged files
        raise UserError(f"could not load '{src.describe()}' in NF4: {first_line(e)}") from e


def _tokenizer(src: ModelSource, m: ModelSection):
    from transformers import AutoTokenizer

    try:
        tok = check_tokenizer(AutoTokenizer.from_pretrained(src.location, revision=m.revision,
                                                            trust_remote_code=m.trust_remote_code))
    except Exception as e:
        raise UserError(f"'{src.describe()}': could not load its tokenizer: {first_line(e)}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _need_bitsandbytes() -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("finetune.method qlora needs bitsandbytes: pip install bitsandbytes")


def keep_nf4_differentiable(model: nn.Module) -> None:
    """bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel at the first
    no-grad forward in eval mode (the held-out loss), and from then on runs that kernel in
    training too, which has no backward: the gradient through every frozen NF4 layer would be
    lost without an error (bitsandbytes 0.50). Training keeps the differentiable path."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------- the adapters

def linear_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The decoder blocks' linear layers the lora section names, by the rule QA-LoRA uses
    (all-linear, or a name's last parts): the same layers for every method. lm_head is never one."""
    from ..models.blocks import decoder_blocks
    from .inject import match_targets

    prefix, blocks = decoder_blocks(model)
    layers = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, mod in b.named_modules()
              if isinstance(mod, nn.Linear)]
    return match_targets(layers, targets, "linear layer of the decoder blocks")


def add_lora(model: nn.Module, lora: LoraSection, base_name: str):
    """-> the PeftModel: LoRA (A Kaiming-uniform, B zero: PEFT's default) on the target layers,
    everything else frozen. The adapters are float32 (PEFT's autocast_adapter_dtype): autocast
    runs them in 16 bits, as the QA-LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    if lora.group_size is not None:
        raise UserError("lora.group_size applies to finetune.method qalora only (QA-LoRA's pooling); unset it")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=linear_targets(model, lora.targets), task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name)
    import_peft_layers_apart(model)
    return get_peft_model(model, config)


def import_peft_layers_apart(model: nn.Module) -> None:
    """PEFT imports GPTQModel's layers the first time it adapts a float model, and GPTQModel keeps
    the ImportError of an optional dependency (llama_cpp) with its traceback, which holds every
    frame of the stack that imported it: the model being adapted, a local there, could never be
    freed (merge --format float kept its first float32 model through the whole verification).
    Imported first from a thread of its own, the stack it holds is that thread's, with no model
    in it. PEFT wraps a bitsandbytes layer before it looks for GPTQModel's: for an NF4 model
    (transformers' is_loaded_in_4bit, which PEFT reads too) it imports nothing, nor does this."""
    from peft.import_utils import is_gptqmodel_available

    if getattr(model, "is_loaded_in_4bit", False) or "gptqmodel.nn_modules.qlinear" in sys.modules:
        return
    if not is_gptqmodel_available():
        return
    worker = threading.Thread(target=importlib.import_module, args=("gptqmodel.nn_modules.qlinear",),
                              name="qalora-import-gptqmodel")
    worker.start()
    worker.join()


# ----------------------------------------------------------------------------- qalora_base.json

def base_record(method: str, m: ModelSection, dtype: torch.dtype, nf4_compute: torch.dtype | None,
                sha256: str) -> dict:
    base = m.model_dump(mode="json")
    if not m.package and Path(m.name_or_path).expanduser().exists():  # reloadable from any folder
        base["name_or_path"] = str(Path(m.name_or_path).expanduser().resolve())
    nf4 = None if nf4_compute is None else {"quant_type": "nf4", "double_quant": True,
                                            "compute_dtype": DTYPE_NAMES[nf4_compute]}
    return {"method": method, "base": base, "dtype": DTYPE_NAMES[dtype], "nf4": nf4, "base_sha256": sha256}


def is_peft_adapter(folder: str | Path) -> bool:
    """A PEFT adapter folder (adapter_config.json with a peft_type), whatever else it holds."""
    path = Path(folder) / PEFT_CONFIG
    try:
        return "peft_type" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def read_base_record(folder: str | Path) -> tuple[dict, ModelSection]:
    """-> (qalora_base.json, its model section), every field checked: a damaged file in one line."""
    folder = Path(folder)
    path = folder / BASE_FILE
    if not is_peft_adapter(folder) or not (folder / PEFT_WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a PEFT adapter ({PEFT_CONFIG} with a peft_type and {PEFT_WEIGHTS} "
                        "expected; PEFT's pickle format is not read)")
    if not path.is_file():
        raise UserError(f"'{folder}' has no {BASE_FILE}: it was not written by `qalora finetune` "
                        "(finetune.method qlora or lora), so its base is unknown")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["method"] not in METHODS or rec["dtype"] not in DTYPES or not isinstance(rec["base_sha256"], str):
            raise ValueError(f"method {rec['method']!r}, dtype {rec['dtype']!r}")
        nf4 = rec["nf4"]
        if (rec["method"] == "qlora") != isinstance(nf4, dict) or (nf4 and nf4.get("compute_dtype") not in DTYPES):
            raise ValueError(f"nf4 {nf4!r:.60} does not fit method {rec['method']}")
        return rec, ModelSection(**rec["base"])
    except UserError:
        raise
    except Exception as e:  # JSON, missing keys, a base the schema refuses
        raise UserError(f"'{path}' is damaged: {first_line(e)}") from None


def load_peft_adapter_model(adapter_dir: str | Path, device: str | torch.device = "cpu",
                            dtype: torch.dtype | None = None, check_base: bool = True):
    """-> (PeftModel in eval mode, tokenizer): the base rebuilt as qalora_base.json says (NF4 or
    16-bit; `dtype` overrides the unquantized parts' dtype, e.g. float32 for exact comparisons)
    with the adapter attached, unmerged. Refuses a base whose files changed since training."""
    rec, m = read_base_record(adapter_dir)
    if check_base:
        check_base_files(adapter_dir, rec, m)
    nf4 = DTYPES[rec["nf4"]["compute_dtype"]] if rec["nf4"] else None
    device = torch.device(device)
    model, tokenizer = load_float_base(m, device, dtype or DTYPES[rec["dtype"]], nf4)
    peft_model = attach_peft_adapter(model, adapter_dir)
    # an NF4 model is placed by its device_map; PEFT puts the adapters beside their base layers
    return (peft_model if nf4 else peft_model.to(device)), tokenizer


def check_base_files(adapter_dir: str | Path, rec: dict, m: ModelSection) -> None:
    if source_sha256(m) != rec["base_sha256"]:
        raise UserError(f"the base of '{adapter_dir}' ({m.name_or_path}) is not the model it was trained on "
                        "(its files' SHA-256 differs)")


def attach_peft_adapter(model: nn.Module, adapter_dir: str | Path):
    """-> the PeftModel (eval mode, unmerged) of `model` with the folder's adapter."""
    from peft import PeftModel

    import_peft_layers_apart(model)
    try:
        # read_base_record saw adapter_model.safetensors, which PEFT prefers to any pickle
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    except Exception as e:  # damaged weights, an adapter for another architecture
        raise UserError(f"'{adapter_dir}': could not attach the adapter: {first_line(e)}") from e
