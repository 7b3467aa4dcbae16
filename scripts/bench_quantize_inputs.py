"""The inputs of scripts/bench_quantize_vs_gptqmodel.py that both tools are given: the float
model as a plain Hugging Face folder, qalora's builtin calibration ids saved as safetensors,
and the spec (plain JSON) that both workers read. Prepared once by the parent, cached in --work.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

BUILTIN_CONFIG = "smollm2-135m-int4"


def make_spec(args: argparse.Namespace, work: Path, hf_dir: Path) -> dict:
    """Everything a worker needs, as plain JSON: both workers read the same spec."""
    calib_file = work / f"calib-builtin-n{args.samples}-len{args.seq_len}-seed{args.seed}.safetensors"
    return {
        "hf_dir": str(hf_dir), "calib_file": str(calib_file), "work": str(work),
        "bits": args.bits, "group_size": args.group_size, "sym": False, "act_order": False,
        "damp_percent": args.damp, "true_sequential": True, "batch_size": args.batch_size,
        "dtype": args.dtype, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
        "gptqmodel_offload_to_disk": args.gptqmodel_offload_to_disk, "threads": args.threads,
    }


def qalora_config(spec: dict, out_dir: Path | None = None):
    """The built-in SmolLM2 config pointed at the HF folder, with the benchmark's settings.
    Used by `prepare_calibration` (for the calibration section) and by the qalora worker alike."""
    from qalora_cli.config.loader import load_config

    overrides = [
        f"model.name_or_path={spec['hf_dir']}", "model.package=null", "model.gguf_file=null",
        f"model.dtype={spec['dtype']}",
        "quantize.method=gptq", f"quantize.bits={spec['bits']}", f"quantize.group_size={spec['group_size']}",
        f"quantize.sym={str(spec['sym']).lower()}", f"quantize.act_order={str(spec['act_order']).lower()}",
        f"quantize.damp_percent={spec['damp_percent']}",
        f"quantize.true_sequential={str(spec['true_sequential']).lower()}",
        f"quantize.batch_size={spec['batch_size']}", "quantize.device=cpu",
        "calibration.source=builtin", f"calibration.num_samples={spec['samples']}",
        f"calibration.seq_len={spec['seq_len']}", f"calibration.seed={spec['seed']}",
        f"output.dir={out_dir or Path(spec['work']) / 'q-qalora'}", "output.overwrite=true",
    ]
    return load_config(BUILTIN_CONFIG, overrides)


def prepare_model_folder(work: Path, layers: int) -> Path:
    """SmolLM2 from the embedded GGUF, saved as a float32 HF folder (safetensors + tokenizer).
    With `layers` > 0 only the first `layers` decoder blocks are kept (smoke tests)."""
    hf_dir = work / (f"hf-smollm2-135m-{layers}L" if layers else "hf-smollm2-135m")
    if (hf_dir / "config.json").is_file():
        return hf_dir
    from qalora_cli.config.loader import load_config
    from qalora_cli.models.blocks import decoder_blocks
    from qalora_cli.models.loading import load_model

    print(f"preparing {hf_dir} from the embedded GGUF ...", flush=True)
    cfg = load_config(BUILTIN_CONFIG, ["model.dtype=float32"])
    model, tokenizer, _ = load_model(cfg.model)
    if layers:
        prefix, blocks = decoder_blocks(model)
        parent, _, attr = prefix.rpartition(".")
        setattr(model.get_submodule(parent), attr, blocks[:layers])
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    # Write to a temporary folder and rename, so an interrupted run leaves no half cache.
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(hf_dir)
    return hf_dir


def prepare_calibration(spec: dict) -> None:
    """qalora's builtin calibration ids, drawn with the HF folder's tokenizer (the one both
    tools load), saved as safetensors at spec["calib_file"]."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qalora_cli.data.calibration import calibration_batches

    if Path(spec["calib_file"]).is_file():
        return
    cfg = qalora_config(spec)
    tokenizer = AutoTokenizer.from_pretrained(spec["hf_dir"])
    ids = calibration_batches(cfg.calibration, tokenizer)
    save_file({"input_ids": ids.contiguous()}, spec["calib_file"])


def load_calibration(path: str):
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]


def ids_digest(ids) -> str:
    import torch

    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
