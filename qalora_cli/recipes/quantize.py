"""`qalora quantize`, top to bottom: load, calibrate, quantize block by block, pack, save.

Call `run(cfg)` from code; the CLI is a thin layer over it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config.schema import RunConfig
from ..data.calibration import calibration_batches, describe
from ..device import resolve_device
from ..lora.init_stats import STATS_NAME, StatsCollector
from ..models.loading import DTYPES, load_model
from ..models.quantized_io import gptq_quantization_config, install_quant_linears, save_quantized
from ..output_dir import atomic_output_dir, check_writable
from ..progress import block_progress
from ..quant.sequential import check_layers, quantize_model

REPORT_NAME = "quantize_report.json"


def _note(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def run(cfg: RunConfig, show_progress: bool = True) -> dict:
    """Quantize `cfg.model` and write the GPTQ checkpoint to `cfg.output.dir`. -> the report."""
    t_start = time.perf_counter()
    q = cfg.quantize
    check_writable(cfg.output.dir, cfg.output.overwrite)  # fail before the slow part
    device = resolve_device(q.device)
    model, tokenizer, src = load_model(cfg.model, "cpu")
    check_layers(model, q)
    calib = calibration_batches(cfg.calibration, tokenizer, model, device, note=_note if show_progress else None)
    t_loaded = time.perf_counter()

    dtype = DTYPES[cfg.output.dtype]
    # What lora.init svd/quailora start from, gathered while W, W~ and H are at hand (lora/init_stats.py)
    stats = StatsCollector(scale_dtype=dtype) if cfg.output.init_stats else None
    with block_progress("quantizing blocks", enabled=show_progress) as advance:
        weights, layers = quantize_model(model, calib, q, device, on_block=advance, layer_stats=stats)
    t_quant = time.perf_counter()

    install_quant_linears(model, weights, dtype)
    report = {
        "model": src.describe(),
        "method": q.method,
        "bits": q.bits,
        "group_size": q.group_size,
        "sym": q.sym,
        "act_order": q.act_order and q.method == "gptq",
        "static_groups": q.static_groups and q.method == "gptq",
        "clip_search": q.clip_search,
        "damp_percent": q.damp_percent,
        "device": str(device),
        "calibration": {"source": describe(cfg.calibration), "num_samples": cfg.calibration.num_samples,
                        "seq_len": cfg.calibration.seq_len, "seed": cfg.calibration.seed},
        "seconds": {"load_and_calibration_data": round(t_loaded - t_start, 2),
                    "quantize": round(t_quant - t_loaded, 2)},
        "mean_rel_output_error": sum(r.rel_output_error for r in layers) / max(1, len(layers)),
        "init_stats": STATS_NAME if stats is not None else None,
        "layers": [r.as_dict() for r in layers],
    }
    with atomic_output_dir(cfg.output.dir, cfg.output.overwrite) as tmp:
        save_quantized(model, tokenizer, tmp, gptq_quantization_config(q), dtype, cfg.output.max_shard_size)
        if stats is not None:
            stats.save(tmp)
        report["seconds"]["save"] = round(time.perf_counter() - t_quant, 2)
        report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["output"] = str(Path(cfg.output.dir))
    return report
