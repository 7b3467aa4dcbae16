"""Adapters to and from PEFT's QA-LoRA (`LoraConfig(use_qalora=True, qalora_group_size=g)`).

PEFT pools contiguous groups of `g` input columns and multiplies the mean by the number of
groups (in/g); we take the plain mean over each quantization group (by g_idx), as the paper's
code does. With the same B and scaling, therefore

    A_ours = A_peft * (in / g)          and          A_peft = A_ours / (in / g).

PEFT cannot express non-contiguous (act-order) groups, so either direction refuses a base
whose g_idx is not contiguous: the converted adapter would compute a different function.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from ..models.quantized_io import read_model_config, weight_files
from ..quant.groups import GroupLayout
from .adapter_io import FORMAT, adapter_config, base_record, checkpoint_sha256, read_adapter

PEFT_PREFIX = "base_model.model."


def base_layer_facts(base_dir: str | Path) -> tuple[dict, dict[str, tuple[int, int, bool]]]:
    """(quantization_config, {layer: (in_features, groups, contiguous g_idx)}) from the files."""
    from safetensors import safe_open

    base_dir = Path(base_dir)
    qc = read_model_config(base_dir).get("quantization_config") or {}
    facts = {}
    for f in weight_files(base_dir):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                if key.endswith(".g_idx"):
                    g_idx = sf.get_tensor(key)
                    layout = GroupLayout(g_idx)
                    facts[key[: -len(".g_idx")]] = (g_idx.numel(), layout.groups, layout.contiguous)
    return qc, facts


def _require_contiguous(facts: dict, names: list[str], base_dir) -> None:
    scattered = [n for n in names if n in facts and not facts[n][2]]
    if scattered:
        raise UserError(f"'{base_dir}' has act-order groups (non-contiguous g_idx, e.g. {scattered[0]}); PEFT's "
                        "QA-LoRA pools contiguous columns, so the adapter cannot be converted; quantize with "
                        "quantize.act_order=false or quantize.static_groups=true")


def export_peft(adapter_dir: str | Path, base_dir: str | Path, out: Path) -> dict:
    """Write `out` as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    config, tensors = read_adapter(adapter_dir)
    _, facts = base_layer_facts(base_dir)
    missing = [t for t in config["targets"] if t not in facts]
    if missing:
        raise UserError(f"the adapter targets {missing[0]}, which '{base_dir}' does not have as a quantized layer")
    _require_contiguous(facts, config["targets"], base_dir)
    peft_tensors = {}
    for t in config["targets"]:
        groups = facts[t][1]
        peft_tensors[f"{PEFT_PREFIX}{t}.lora_A.weight"] = (tensors[f"{t}.lora_A"] / groups).contiguous()
        peft_tensors[f"{PEFT_PREFIX}{t}.lora_B.weight"] = tensors[f"{t}.lora_B"].contiguous()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": config["base"]["model"],
        "r": config["rank"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": sorted(config["targets"]), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
        "use_qalora": True, "qalora_group_size": config["group_size"],
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    return peft_config


def import_peft(peft_dir: str | Path, base_dir: str | Path, out: Path) -> dict:
    """Write `out` as a qalora adapter for `base_dir` from a PEFT QA-LoRA adapter."""
    from safetensors.torch import load_file, save_file

    peft_dir = Path(peft_dir)
    cfg_path, w_path = peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"'{peft_dir}' is not a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
    pc = json.loads(cfg_path.read_text())
    if pc.get("peft_type") != "LORA" or not pc.get("use_qalora"):
        raise UserError(f"'{peft_dir}' is not a QA-LoRA adapter (PEFT LoRA with use_qalora: true); a plain "
                        "LoRA adapter cannot be folded into zero points")
    if pc.get("use_dora"):
        raise UserError(f"'{peft_dir}' uses DoRA, which QA-LoRA cannot merge")
    qc, facts = base_layer_facts(base_dir)
    g = pc.get("qalora_group_size", 16)
    if g != qc.get("group_size"):
        raise UserError(f"the PEFT adapter's qalora_group_size {g} disagrees with the checkpoint's group size "
                        f"{qc.get('group_size')}; the adapter only merges into the groups it pooled over")
    raw = load_file(w_path)
    targets = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in raw if ".lora_A." in k})
    if not targets:
        raise UserError(f"'{w_path}' holds no lora_A weights")
    missing = [t for t in targets if t not in facts]
    if missing:
        raise UserError(f"the PEFT adapter targets {missing[0]}, which '{base_dir}' does not have as a quantized layer")
    _require_contiguous(facts, targets, base_dir)
    r, alpha = pc["r"], pc["lora_alpha"]
    # PEFT scales by alpha/sqrt(r) under rsLoRA; ours is alpha/r: fold the ratio into A.
    ratio = (alpha / math.sqrt(r)) / (alpha / r) if pc.get("use_rslora") else 1.0
    tensors = {}
    for t in targets:
        a = raw[f"{PEFT_PREFIX}{t}.lora_A.weight"].float()
        tensors[f"{t}.lora_A"] = (a * facts[t][1] * ratio).contiguous()
        tensors[f"{t}.lora_B"] = raw[f"{PEFT_PREFIX}{t}.lora_B.weight"].float().contiguous()
    base = base_record(base_dir, pc.get("base_model_name_or_path") or "unknown", checkpoint_sha256(base_dir), qc)
    config = adapter_config(r, alpha, pc.get("lora_dropout", 0.0), g, targets, base, imported_from="peft")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": FORMAT})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
