"""Adapter files: `adapter_model.safetensors` (each target's lora_A [r, groups] and lora_B
[out, r], float32) and `adapter_config.json` (rank, alpha, group size, targets, and the base
checkpoint's identity, quantization and SHA-256, so that a merge onto another base is refused).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config.schema import LoraSection
from ..errors import UserError, first_line
from ..models.quantized_io import weight_files

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "qalora-adapter"


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 over the checkpoint's weight files (names and bytes): the base's identity."""
    h = hashlib.sha256()
    for f in weight_files(path):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def make_adapter_config(lora: LoraSection, adapters: dict[str, nn.Module], quantization: dict,
                        base_path: str | Path, base_sha256: str, base_model: str, data: dict | None = None) -> dict:
    """`data`: the data section the adapter was trained on, so that a GPTQ export can re-round
    the merged codes on the adapter's own inputs (export/gptq_refit.py)."""
    first = next(iter(adapters.values()))
    return adapter_config(lora.rank, lora.alpha, lora.dropout, first.base.group_size, list(adapters),
                          base_record(base_path, base_model, base_sha256, quantization), data=data)


def adapter_config(rank: int, alpha: float, dropout: float, group_size: int, targets: list[str], base: dict,
                   **extra) -> dict:
    """adapter_config.json of a QA-LoRA adapter (trained here or imported); `extra` after the rest."""
    return {
        "format": FORMAT,
        "version": 1,
        "rank": rank,
        "alpha": alpha,
        "scaling": alpha / rank,
        "dropout": dropout,
        "group_size": group_size,
        "pooling": "mean over the columns of each quantization group, by g_idx",
        "targets": targets,
        "base": base,
        **extra,
    }


def base_record(path: str | Path, model: str, sha256: str, quantization: dict) -> dict:
    """The base checkpoint as an adapter records it: a merge onto any other base is refused."""
    return {"path": str(path), "model": model, "sha256": sha256, "bits": quantization.get("bits"),
            "group_size": quantization.get("group_size"), "desc_act": quantization.get("desc_act"),
            "sym": quantization.get("sym")}


def merged_adapter_record(config: dict, base_sha256: str) -> dict:
    """What a merged model records of the adapter folded into it (every merge format alike)."""
    return {"rank": config["rank"], "alpha": config["alpha"], "layers": len(config["targets"]),
            "base_sha256": base_sha256}


def adapter_state(adapters: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in adapters.items():
        state[f"{name}.lora_A"] = m.lora_A.detach().float().cpu().contiguous()
        state[f"{name}.lora_B"] = m.lora_B.detach().float().cpu().contiguous()
    return state


def save_adapter(folder: Path, adapters: dict[str, nn.Module], config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(adapters), folder / ADAPTER_WEIGHTS, metadata={"format": FORMAT})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> dict:
    """The adapter's config, after checking the folder holds a qalora adapter (no tensor read)."""
    folder = Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"'{folder}' is not a qalora adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"'{cfg_path}' is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"'{cfg_path}' is not an adapter config (a JSON object expected, got {type(config).__name__})")
    if config.get("format") != FORMAT:
        hint = " (a PEFT adapter: import it with `qalora adapter import-peft`)" if "peft_type" in config else ""
        raise UserError(f"'{folder}' is not a qalora adapter{hint}")
    try:
        from safetensors import safe_open

        with safe_open(w_path, "pt") as f:
            names = set(f.keys())
    except Exception as e:
        raise UserError(f"'{w_path}': corrupt adapter weights: {first_line(e)}") from e
    check_adapter_config(config, cfg_path)
    for name in config["targets"]:
        if f"{name}.lora_A" not in names or f"{name}.lora_B" not in names:
            raise UserError(f"'{folder}': the weights lack the adapter of {name}")
    return config


def check_adapter_config(config: dict, cfg_path: Path) -> None:
    """Every field the readers use, with its type and range: a damaged file is refused in one line."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {
        "rank": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "alpha": lambda v: number(v) and v > 0,
        "scaling": number,
        "group_size": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "targets": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(t, str) and t for t in v),
        "base": lambda v: isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("path"), str),
    }
    for key, ok in checks.items():
        if not ok(config.get(key)):
            raise UserError(f"'{cfg_path}' is damaged: '{key}' is {config.get(key)!r:.60}")


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = read_adapter_config(folder)
    w_path = Path(folder) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(w_path)
    except Exception as e:
        raise UserError(f"'{w_path}': corrupt adapter weights: {first_line(e)}") from e
    return config, tensors


def check_base(config: dict, base_path: str | Path, base_sha256: str | None = None) -> None:
    """Refuse an adapter trained on another base checkpoint."""
    want = config["base"]["sha256"]
    have = base_sha256 or checkpoint_sha256(base_path)
    if want != have:
        raise UserError(f"the adapter was trained on another base (sha256 {want[:12]}..., from "
                        f"'{config['base']['path']}'), not on '{base_path}' (sha256 {have[:12]}...)")


def attach_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Wrap the adapter's target layers of `model` and load A and B (dropout off)."""
    from .inject import inject_qalora, quantized_linears

    layers = quantized_linears(model)
    missing = [t for t in config["targets"] if t not in layers]
    if missing:
        raise UserError(f"the adapter targets {missing[0]}, which the model does not have as a quantized layer")
    for t in config["targets"]:
        a, b = tensors[f"{t}.lora_A"], tensors[f"{t}.lora_B"]
        layer = layers[t]
        if a.shape != (config["rank"], layer.scales.shape[0]) or b.shape != (layer.out_features, config["rank"]):
            raise UserError(f"adapter of {t}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank "
                            f"{config['rank']} and the layer's {layer.scales.shape[0]} groups x "
                            f"{layer.out_features} outputs (group size {layer.group_size} in the model, "
                            f"{config['group_size']} in the adapter)")
    lora = LoraSection(rank=config["rank"], alpha=config["alpha"], dropout=0.0, targets=config["targets"])
    adapters = inject_qalora(model, lora)
    with torch.no_grad():
        for t, m in adapters.items():
            m.lora_A.copy_(tensors[f"{t}.lora_A"])
            m.lora_B.copy_(tensors[f"{t}.lora_B"])
    return adapters
