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
from ..errors import UserError
from ..lora.init_stats import STATS_NAME, StatsCollector, stats_rank
from ..models.blocks import decoder_blocks
from ..models.loading import DTYPES, load_model
from ..models.quantized_io import gptq_quantization_config, install_quant_linears, save_quantized
from ..output_dir import atomic_output_dir, check_writable, discard, is_disk_full, sweep_stale
from ..progress import block_progress
from ..quant.block_store import (QuantizeProgress, check_same, kept_note, progress_dir, read_settings,
                                 settings_digest, tensors_identity)
from ..quant.sequential import check_layers, quantize_model

REPORT_NAME = "quantize_report.json"


def _note(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def run(cfg: RunConfig, show_progress: bool = True, resume: bool = False) -> dict:
    """Quantize `cfg.model` and write the GPTQ checkpoint to `cfg.output.dir`. -> the report.
    Each block is saved as it finishes (in `<output>.partial/`); `resume` continues after the last
    one saved, and gives the checkpoint an uninterrupted run gives."""
    t_start = time.perf_counter()
    q, out = cfg.quantize, Path(cfg.output.dir)
    settings = resume_settings(cfg)
    finished = _finished_report(out, settings, resume)
    if finished is not None:
        return finished
    check_writable(out, cfg.output.overwrite)  # fail before the slow part
    _check_progress(progress_dir(out), settings, resume, cfg.output.overwrite)
    device = resolve_device(q.device)
    model, tokenizer, src = load_model(cfg.model, "cpu")
    check_layers(model, q)
    calib = calibration_batches(cfg.calibration, tokenizer, model, device, note=_note if show_progress else None)
    t_loaded = time.perf_counter()

    dtype = DTYPES[cfg.output.dtype]
    # What lora.init svd/quailora start from, gathered while W, W~ and H are at hand (lora/init_stats.py)
    stats = StatsCollector(scale_dtype=dtype, rank=stats_rank(cfg)) if cfg.output.init_stats else None
    inputs = {"model_weights": tensors_identity(model.state_dict()),
              "calibration": tensors_identity({"ids": calib}, samples=calib.numel())}
    progress = QuantizeProgress.open(progress_dir(out), settings, inputs, len(decoder_blocks(model)[1]),
                                     fresh=not resume, stats=stats)
    if resume and progress.finished() and show_progress:
        _note(f"resuming after block {progress.finished()} (progress in '{progress.folder}')")
    with block_progress("quantizing blocks", enabled=show_progress) as advance:
        # Each finished block is packed into the model at once: its float weights go, so the
        # memory falls as the run proceeds instead of every layer's codes piling up to the end.
        _, layers = quantize_model(model, calib, q, device, on_block=advance, layer_stats=stats, store=progress,
                                   asymmetric=q.target == "float",
                                   hand_over=lambda block_weights: install_quant_linears(model, block_weights, dtype))
    t_quant = time.perf_counter()

    seconds = {"load_and_calibration_data": round(t_loaded - t_start, 2), "quantize": round(t_quant - t_loaded, 2)}
    report = _report(cfg, src, device, layers, stats, seconds, {"settings": settings_digest(settings),
                                                                "inputs": inputs})
    try:
        with atomic_output_dir(out, cfg.output.overwrite, needs=_output_bytes(model, dtype, stats)) as tmp:
            save_quantized(model, tokenizer, tmp, gptq_quantization_config(q), dtype, cfg.output.max_shard_size)
            if stats is not None:
                stats.save(tmp)
            report["seconds"]["save"] = round(time.perf_counter() - t_quant, 2)
            report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    except UserError as e:
        if is_disk_full(e.__cause__):  # the quantized blocks stay: --resume only writes the output
            raise UserError(kept_note(e, progress.folder, progress.finished())) from e
        raise
    progress.remove()  # a kill before this: the next run sees the progress belongs to the finished output
    report["output"] = str(out)
    return report


def resume_settings(cfg: RunConfig) -> dict:
    """Everything in the config that changes the quantized checkpoint: a run resumes only
    progress made with the same."""
    return {"model": cfg.model.model_dump(mode="json"), "quantize": cfg.quantize.model_dump(mode="json"),
            "calibration": cfg.calibration.model_dump(mode="json"),
            "output": {"dtype": cfg.output.dtype, "init_stats": cfg.output.init_stats,
                       "init_stats_inputs": cfg.output.init_stats_inputs, "init_stats_rank": stats_rank(cfg),
                       "max_shard_size": cfg.output.max_shard_size}}


def _finished_report(out: Path, settings: dict, resume: bool) -> dict | None:
    """Settle a finished output found at `out` before anything is loaded. Progress left beside
    it by the run that finished it (killed after the rename, before the clean-up) is removed;
    with `resume`, an output finished with these settings is the answer: nothing to redo."""
    sweep_stale(out)
    folder = progress_dir(out)
    sweep_stale(folder)
    try:
        report = json.loads((out / REPORT_NAME).read_text())
        made_with = report["resume"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if folder.is_dir():
        try:
            recorded = read_settings(folder)
            if made_with == {"settings": settings_digest(recorded["settings"]), "inputs": recorded["inputs"]}:
                discard(folder)
        except (UserError, KeyError, TypeError):
            pass  # another run's progress: check_progress decides
    if resume and not folder.exists() and isinstance(made_with, dict) \
            and made_with.get("settings") == settings_digest(settings):
        _note(f"'{out}' is already finished with these settings: nothing to resume")
        return dict(report, output=str(out))
    return None


def _check_progress(folder: Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Before the slow part: unfinished progress is continued (--resume) or discarded (--overwrite)
    but never silently; progress made with other settings is never continued."""
    if not folder.exists():
        return
    if not resume and not overwrite:
        raise UserError(f"'{folder}' holds an unfinished quantization of this output: continue it with "
                        "--resume, or pass --overwrite to start over")
    if resume:
        check_same(folder, read_settings(folder).get("settings"), settings, "settings")


def _output_bytes(model, dtype, stats) -> int:
    """About what the checkpoint will take on disk: its tensors in the saved dtype."""
    size = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())
    return size + (sum(t.numel() * t.element_size() for t in stats.tensors.values()) if stats else 0)


def _report(cfg: RunConfig, src, device, layers, stats, seconds: dict, made_with: dict) -> dict:
    q = cfg.quantize
    return {
        "model": src.describe(),
        "method": q.method,
        "target": q.target,
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
        "seconds": seconds,
        "mean_rel_output_error": sum(r.rel_output_error for r in layers) / max(1, len(layers)),
        "init_stats": STATS_NAME if stats is not None else None,
        "init_stats_inputs": stats.inputs() if stats is not None else None,
        "layers": [r.as_dict() for r in layers],
        # what `--resume` checks a finished output against (quant/block_store.py)
        "resume": made_with,
    }
