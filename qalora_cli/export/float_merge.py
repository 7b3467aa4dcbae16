"""`qalora merge --format float`: a qlora or lora (PEFT) adapter merged into the float model,
saved as a plain Hugging Face folder (safetensors, config.json, tokenizer) that `qalora quantize
--model` takes: the paper's "QLoRA w/ GPTQ" baseline is this folder quantized.

Verified like the other merges: the reloaded folder's logits against the float model with the
adapter attached unmerged (equal to float rounding, else nothing is kept). A qlora adapter was
trained against NF4 weights: merging it into the float weights moves the model by the NF4
error, which is measured and reported (the NF4 model + adapter against the merged model), not
refused: that loss is what the baseline is about.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from ..config.schema import RunConfig
from ..errors import UserError

REPORT_NAME = "merge_report.json"
# A merged folder in float32 must match the unmerged model to float32 rounding (as the exact
# qalora merge); in 16 bits the merged weights W + s B A are rounded once more.
FLOAT32_TOLERANCE = 1e-3
HALF_TOLERANCE = 2e-2


def float_merge_paths(cfg: RunConfig) -> tuple[Path, Path]:
    """(the adapter, the output): defaults output.dir + '-<finetune.method>' and '-merged-float'."""
    m, stem = cfg.merge, cfg.output.dir.rstrip("/")
    adapter = Path(m.adapter_dir or cfg.train.adapter_dir or f"{stem}-{cfg.finetune.method}")
    return adapter, Path(m.dir or f"{stem}-merged-float")


def route_float_merge(cfg: RunConfig, overwrite: bool, show_progress: bool) -> dict | None:
    """The merge recipe's first step: a PEFT adapter or --format float is merged here (-> the
    report); a QA-LoRA adapter with another format is left to the recipe (-> None). Mismatches
    are refused in one line."""
    from ..lora.peft_models import is_peft_adapter

    fmt = cfg.merge.format
    if fmt == "float":
        adapter, out = float_merge_paths(cfg)
        if not is_peft_adapter(adapter):
            what = "a QA-LoRA adapter" if (adapter / "adapter_config.json").is_file() else "not an adapter folder"
            raise UserError(f"--format float merges a qlora or lora (PEFT) adapter into the float model; '{adapter}' "
                            f"is {what} (merge a QA-LoRA adapter with --format qalora, gptq, gguf or mlx)")
        return merge_float(cfg, adapter, out, overwrite)
    from ..recipes.merge import merge_paths

    adapter = merge_paths(cfg)[1]
    if is_peft_adapter(adapter):
        raise UserError(f"'{adapter}' is a PEFT (qlora/lora) adapter: it merges into the float model only, "
                        f"with --format float (not {fmt})")
    return None


def merge_float(cfg: RunConfig, adapter_dir: Path, out: Path, overwrite: bool) -> dict:
    from ..device import resolve_device
    from ..lora.peft_models import check_base_files, read_base_record
    from ..dtypes import DTYPES
    from ..output_dir import atomic_output_dir, check_writable

    t0 = time.perf_counter()
    check_writable(out, overwrite)  # every refusal before the slow part
    rec, source = read_base_record(adapter_dir)
    check_base_files(adapter_dir, rec, source)
    device = resolve_device(cfg.merge.device) if cfg.merge.verify else None
    dtype = DTYPES[source.dtype]  # the float source's own dtype (quantize reads the folder as it reads the source)
    report = {"format": "float", "method": rec["method"], "adapter": str(adapter_dir), "output": str(out),
              "base": rec["base"], "dtype": source.dtype}
    with atomic_output_dir(out, overwrite) as tmp:
        tokenizer = write_merged_float(source, adapter_dir, tmp, dtype)
        report["seconds"] = {"write": round(time.perf_counter() - t0, 2)}
        if cfg.merge.verify:
            t1 = time.perf_counter()
            report.update(verify_float(cfg, rec, source, adapter_dir, tmp, tokenizer, device))
            report["seconds"]["verify"] = round(time.perf_counter() - t1, 2)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_merged_float(source, adapter_dir: Path, folder: Path, dtype: torch.dtype):
    """W + (alpha / r) B A in float32, saved in the source's dtype with its tokenizer; -> the tokenizer."""
    from ..lora.peft_models import attach_peft_adapter, load_float_base

    model, tokenizer = load_float_base(source, torch.device("cpu"), torch.float32, None)
    merged = attach_peft_adapter(model, adapter_dir).merge_and_unload()
    merged.to(dtype).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del merged, model
    gc.collect()
    return tokenizer


def verify_float(cfg: RunConfig, rec: dict, source, adapter_dir: Path, folder: Path, tokenizer, device) -> dict:
    """-> {"verification": merged vs unmerged float, "nf4_vs_merged": for qlora}; raises beyond
    float rounding (the output is then removed)."""
    from .verify import compare, make_probe

    m = cfg.merge
    probe = make_probe(tokenizer, m.verify_prompts, m.verify_tokens, m.generate_tokens, m.ppl_tokens)
    merged = _probe_merged(folder, probe, device)
    result = compare(_probe_unmerged(source, adapter_dir, probe, device), merged)
    tolerance = FLOAT32_TOLERANCE if source.dtype == "float32" else HALF_TOLERANCE
    result["tolerance"] = tolerance
    if not result["relative"] <= tolerance:  # NaN fails too
        raise UserError(f"verification failed: the merged float model's logits differ from the unmerged model's "
                        f"by {result['relative']:.2e} of the largest logit (tolerance {tolerance:.0e}); nothing "
                        "was written")
    result["verdict"] = "pass"
    out = {"verification": result}
    if rec["nf4"]:
        nf4 = compare(_probe_trained(adapter_dir, probe, device), merged)
        nf4["note"] = ("the QLoRA model as trained (NF4 base, 16-bit elsewhere, + adapter) against the merged float "
                       "model: the NF4 (and 16-bit) rounding of the base, which the merge gives up (reported, not "
                       "refused)")
        out["nf4_vs_merged"] = nf4
    return out


def _probe_merged(folder: Path, probe, device) -> dict:
    """The merged folder as its users load it: plain transformers, float32."""
    from transformers import AutoModelForCausalLM

    return _run_and_free(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval(), probe)


def _probe_unmerged(source, adapter_dir: Path, probe, device) -> dict:
    """The float base with the adapter attached, unmerged, all in float32: what the merge must equal."""
    from ..lora.peft_models import attach_peft_adapter, load_float_base

    model, _ = load_float_base(source, device, torch.float32, None)
    return _run_and_free(attach_peft_adapter(model, adapter_dir).to(device), probe)


def _probe_trained(adapter_dir: Path, probe, device) -> dict:
    """The model as trained and evaluated: the NF4 base (as qalora_base.json says) + the adapter."""
    from ..lora.peft_models import load_peft_adapter_model

    return _run_and_free(load_peft_adapter_model(adapter_dir, device, check_base=False)[0], probe)


def _run_and_free(model, probe) -> dict:
    from .verify import run_probe

    result = run_probe(model, probe)
    del model
    gc.collect()
    return result
