"""What a fine-tune trains, for each finetune.method: the model with its adapters, the
trainable parameters, the base's identity, and how the adapter is checkpointed and written.
The loop, data, optimizer, evaluation and reports (recipes/finetune.py) are the same for all.

  qalora  QA-LoRA adapters around the GPTQ checkpoint's quantized layers (this project's method)
  qlora   PEFT LoRA on the float model in bitsandbytes NF4, double quantization (the paper's baseline)
  lora    PEFT LoRA on the float model held in 16 bits (the upper bound)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..config.schema import RunConfig
from ..errors import UserError


class Trainee:
    """model: the causal LM the loss, evaluation and generation run (adapters inside);
    params: what the optimizer updates; base_sha256 and base: the base's identity."""
    model: torch.nn.Module
    tokenizer: object
    params: list[torch.nn.Parameter]
    base_sha256: str
    base: str
    init_report: dict

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (float32, cpu): what a checkpoint stores."""
        raise NotImplementedError

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint's tensors back into the adapters; ValueError/KeyError when they do not fit."""
        raise NotImplementedError

    def write_adapter(self, folder: Path, data: dict) -> None:
        """The finished adapter's files into `folder` (adapter_config.json among them)."""
        raise NotImplementedError

    def report(self) -> dict:
        return {}


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if src.shape != dst.shape or not src.is_floating_point():
        raise ValueError(f"{name} is {src.dtype} {tuple(src.shape)}, the run's is {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- qalora

class QALoRATrainee(Trainee):
    def __init__(self, cfg: RunConfig, acc, base_dir: Path, resume: bool):
        from ..kernels.registry import use_backend
        from ..lora.adapter_io import checkpoint_sha256
        from ..lora.init_stats import initialize_adapters
        from ..lora.inject import inject_qalora
        from ..models.loading import load_tokenizer
        from ..models.quantized_io import load_quantized

        t, note = cfg.train, _say if acc.is_main_process else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32) \
            if acc.device.type == "cuda" else torch.float32
        self.cfg, self.base_dir = cfg, base_dir
        self.model, self.qc = load_quantized(base_dir, acc.device, dtype)
        self.tokenizer = load_tokenizer(base_dir)
        self.base_sha256, self.base = checkpoint_sha256(base_dir), str(base_dir)
        torch.manual_seed(t.seed)  # the same adapter initialization on every process
        self.adapters = inject_qalora(self.model, cfg.lora)
        # Where the adapters start (lora.init), before anything is written, so a refusal leaves
        # nothing behind. A resumed run takes its adapters from the checkpoint instead.
        self.init_report = {"method": cfg.lora.init, "resumed": True} if resume else \
            initialize_adapters(cfg, base_dir, self.adapters, note=note)
        kernels = use_backend(self.model, t.kernel, dtype, need_grad=True)
        if note:
            note(kernels.summary())
        self.params = [p for m in self.adapters.values() for p in (m.lora_A, m.lora_B)]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        from ..lora.adapter_io import adapter_state

        return adapter_state(self.adapters)

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, m in self.adapters.items():
            _copy_checked(m.lora_A, tensors[f"{name}.lora_A"], f"the adapter of {name} (A)")
            _copy_checked(m.lora_B, tensors[f"{name}.lora_B"], f"the adapter of {name} (B)")

    def write_adapter(self, folder: Path, data: dict) -> None:
        from ..lora.adapter_io import make_adapter_config, save_adapter

        config = make_adapter_config(self.cfg.lora, self.adapters, self.qc, self.base_dir, self.base_sha256,
                                     _model_name(self.base_dir), data)
        save_adapter(folder, self.adapters, config)


def _model_name(base_dir: Path) -> str:
    cfg = json.loads((base_dir / "config.json").read_text())
    return cfg.get("_name_or_path") or cfg.get("model_type", "unknown")


# ----------------------------------------------------------------------------- qlora, lora

class PeftTrainee(Trainee):
    def __init__(self, cfg: RunConfig, acc):
        from ..lora.peft_models import add_lora, base_record, keep_nf4_differentiable, load_float_base, source_sha256
        from ..models.source import resolve_source

        method = cfg.finetune.method
        # 16 bits as the paper's baselines: the accelerator's half type (bf16 unless fp16 was asked for)
        dtype = torch.float16 if acc.mixed_precision == "fp16" else torch.bfloat16
        nf4 = dtype if method == "qlora" else None
        self.base = resolve_source(cfg.model).describe()
        self.base_sha256 = source_sha256(cfg.model)
        lm, self.tokenizer = load_float_base(cfg.model, acc.device, dtype, nf4)
        if nf4 is not None:
            keep_nf4_differentiable(lm)
        lm.config.use_cache = False
        torch.manual_seed(cfg.train.seed)  # the same adapter initialization on every process
        self.peft_model = add_lora(lm, cfg.lora, self.base)
        # The loss and generation run the transformers model PEFT injected its layers into, as for QA-LoRA.
        self.model = self.peft_model.base_model.model
        self.named = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        self.params = list(self.named.values())
        self.record = base_record(method, cfg.model, dtype, nf4, self.base_sha256)
        self.init_report = {"method": "zero", "note": "PEFT's LoRA init: A Kaiming-uniform, B = 0 (the base itself)"}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().contiguous() for n, p in self.named.items()}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.named):
            raise ValueError(f"its tensors are not this run's adapters ({len(tensors)} vs {len(self.named)})")
        for n, p in self.named.items():
            _copy_checked(p, tensors[n], n)

    def write_adapter(self, folder: Path, data: dict) -> None:
        from ..lora.peft_models import BASE_FILE

        self.peft_model.save_pretrained(str(folder), safe_serialization=True)
        (folder / BASE_FILE).write_text(json.dumps(self.record, indent=2) + "\n")

    def report(self) -> dict:
        return {"base_dtype": self.record["dtype"], "nf4": self.record["nf4"],
                "adapter_dtype": str(self.params[0].dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------- choosing

def check_method_inputs(cfg: RunConfig, base_dir: Path) -> None:
    """Every refusal that needs no model loaded, before the slow part."""
    method = cfg.finetune.method
    if method == "qalora":
        if not (base_dir / "config.json").is_file():
            raise UserError(f"no quantized model at '{base_dir}': run `qalora quantize` first or pass --model")
        return
    if cfg.lora.init not in ("zero", "auto"):
        raise UserError(f"lora.init {cfg.lora.init} applies to finetune.method qalora only; {method} starts from "
                        "PEFT's B = 0 (lora.init zero)")
    if cfg.lora.group_size is not None:
        raise UserError(f"lora.group_size applies to finetune.method qalora only (QA-LoRA's pooling); unset it "
                        f"for {method}")
    if cfg.train.quantized_model is not None:
        raise UserError(f"finetune.method {method} trains on the model section's float model, not on "
                        f"train.quantized_model ('{cfg.train.quantized_model}'); unset it (or --model)")
    if method == "qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("finetune.method qlora needs bitsandbytes: pip install bitsandbytes")
    from ..models.source import resolve_source

    resolve_source(cfg.model)  # a missing model is refused here, in one line


def build_trainee(cfg: RunConfig, acc, base_dir: Path, resume: bool) -> Trainee:
    if cfg.finetune.method == "qalora":
        return QALoRATrainee(cfg, acc, base_dir, resume)
    return PeftTrainee(cfg, acc)
