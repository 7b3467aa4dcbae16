"""`qalora merge`, top to bottom: check the adapter against the base, fold it into the zero
points layer by layer while writing the chosen format, reload the output and compare it with
the unmerged model, and keep the output only if it passes.

Call `run(cfg)` from code; the CLI is a thin layer over it.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from ..config.schema import RunConfig
from ..device import resolve_device
from ..errors import UserError
from ..export.checkpoint_reader import CheckpointReader
from ..export.layer_merge import LayerMerger
from ..export.safetensors_export import merged_quantization_config, write_merged_safetensors, write_side_files
from ..export.verify import EXACT_RELATIVE_TOLERANCE, compare, make_probe, run_probe, unmerged_model
from ..lora.adapter_io import check_base, checkpoint_sha256, read_adapter_config
from ..memory import peak_rss_mib
from ..models.quantized_io import MERGED_QUANT_METHOD, quant_method_of, read_model_config
from ..output_dir import atomic_output_dir, check_writable
from ..progress import block_progress

REPORT_NAME = "merge_report.json"
GGUF_NAME = "model.gguf"
# GGUF stores m = -s z' in float16: each group's weights may move by half an fp16 ulp of m.
# Measured on SmolLM2-135M (docs/BENCHMARKS.md); this bound holds with a wide margin.
GGUF_RELATIVE_TOLERANCE = 2e-2


def merge_paths(cfg: RunConfig) -> tuple[Path, Path, Path]:
    """(the quantized base, the adapter, the merged output)."""
    m, stem = cfg.merge, cfg.output.dir.rstrip("/")
    base = Path(m.quantized_model or cfg.train.quantized_model or stem)
    adapter = Path(m.adapter_dir or cfg.train.adapter_dir or f"{stem}-qalora")
    suffix = "" if m.format == "qalora" else f"-{m.format}"
    return base, adapter, Path(m.dir or f"{stem}-merged{suffix}")


def _base_quantization(base: Path) -> dict:
    config = read_model_config(base)
    method = quant_method_of(config)
    if method != "gptq":
        what = "a merged model" if method == MERGED_QUANT_METHOD else "not GPTQ"
        raise UserError(f"'{base}' is {what}: merge onto the GPTQ checkpoint the adapter was trained on")
    qc = config["quantization_config"]
    bits, group_size = qc.get("bits"), qc.get("group_size")
    if bits not in (2, 3, 4, 8) or type(group_size) is not int or not (group_size == -1 or group_size > 0):
        raise UserError(f"'{base / 'config.json'}': quantization_config has bits {bits!r} and group_size "
                        f"{group_size!r}; expected bits 2, 3, 4 or 8 and a group size > 0 (or -1)")
    return {**qc, "model_type": config.get("model_type")}


def run(cfg: RunConfig, overwrite: bool = False, show_progress: bool = True) -> dict:
    from ..export.float_merge import route_float_merge

    floated = route_float_merge(cfg, overwrite, show_progress)  # qlora/lora adapters, --format float
    if floated is not None:
        return floated
    t_start = time.perf_counter()
    m = cfg.merge
    base, adapter_dir, out = merge_paths(cfg)
    check_writable(out, overwrite)  # every refusal before the slow part
    adapter_cfg, qc, base_sha = _check_inputs(m.format, base, adapter_dir)
    device = resolve_device(m.device) if m.verify else None
    report = {"format": m.format, "base": str(base), "adapter": str(adapter_dir), "output": str(out),
              "bits": qc["bits"], "group_size": qc["group_size"], "desc_act": bool(qc.get("desc_act")),
              "rank": adapter_cfg["rank"], "alpha": adapter_cfg["alpha"], "layers": len(adapter_cfg["targets"])}
    with CheckpointReader(base) as reader, LayerMerger(reader, adapter_dir, adapter_cfg, qc["bits"],
                                                                   qc["group_size"]) as merger, \
            atomic_output_dir(out, overwrite, needs=sum(f.stat().st_size for f in reader.files)) as tmp:
        t_checked = time.perf_counter()
        rows = _write_merged(cfg, base, merger, adapter_cfg, qc, base_sha, tmp, report, show_progress)
        report["seconds"] = {"check": round(t_checked - t_start, 2), "write": round(time.perf_counter() - t_checked, 2)}
        report["peak_rss_mib_merge"] = round(peak_rss_mib(), 1)
        report["layer_report"] = rows
        report["zero_rounding"] = _rounding_summary(rows) if m.format == "gptq" else None
        if m.verify:
            _verify_output(cfg, base, adapter_dir, merger, tmp, device, report)
        report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
        report["peak_rss_mib"] = round(peak_rss_mib(), 1)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_inputs(fmt: str, base: Path, adapter_dir: Path) -> tuple[dict, dict, str]:
    """-> (the adapter's config, the base's quantization config, the base's digest): the adapter
    was trained on this base, and the base suits the format."""
    if not base.is_dir():
        raise UserError(f"the quantized model '{base}' does not exist")
    adapter_cfg = read_adapter_config(adapter_dir)
    qc = _base_quantization(base)
    if fmt == "gguf":
        from ..export.gguf_writer import check_gguf_compatible

        contiguous = not qc.get("desc_act") or bool(qc.get("static_groups"))
        check_gguf_compatible(qc["model_type"], qc["bits"], qc["group_size"], contiguous)
    if fmt == "mlx":
        from ..export.mlx_merge import check_mlx_compatible

        check_mlx_compatible(base, qc)
    base_sha = checkpoint_sha256(base)
    check_base(adapter_cfg, base, base_sha)
    return adapter_cfg, qc, base_sha


def _write_merged(cfg: RunConfig, base: Path, merger: LayerMerger, adapter_cfg: dict, qc: dict, base_sha: str,
                  tmp: Path, report: dict, show_progress: bool) -> list[dict]:
    """Fold the adapter into each layer while writing `tmp` in the chosen format. -> one row
    a layer; the refit's and the format's own facts go into `report`."""
    m = cfg.merge
    refitted = None
    if m.format == "gptq" and m.rounding != "nearest":
        refitted, report["refit"] = _refit(cfg, base, merger, adapter_cfg, show_progress)
    with block_progress("merging layers", enabled=show_progress) as show:
        advance = _every_tenth(show, len(merger.targets))
        if m.format == "gguf":
            from ..export.gguf_merge import write_merged_gguf

            rows = write_merged_gguf(merger, base, tmp / GGUF_NAME, m.gguf_float_type, on_layer=advance)
            (tmp / "Modelfile").write_text(f"FROM ./{GGUF_NAME}\n")
            return rows
        if m.format == "mlx":
            from ..export.mlx_merge import write_merged_mlx

            report["mlx_dtype"] = m.mlx_dtype
            return write_merged_mlx(merger, base, tmp, m.mlx_dtype, base_sha, on_layer=advance)
        rows = write_merged_safetensors(merger, tmp, m.format, on_layer=advance, refitted=refitted)
    qc_out = merged_quantization_config(qc, m.format, adapter_cfg, base_sha)
    if m.format == "gptq":  # how the fractional zeros became integers, for whoever reads the model
        qc_out["qalora_merged_adapter"]["rounding"] = m.rounding
    write_side_files(base, tmp, qc_out, m.format)
    return rows


def _verify_output(cfg: RunConfig, base: Path, adapter_dir: Path, merger: LayerMerger, tmp: Path, device,
                   report: dict) -> None:
    """The written weights read back (gguf, mlx), then the model run against the unmerged one;
    raises, so that nothing is kept, when an exact format misses."""
    fmt = cfg.merge.format
    t_verify = time.perf_counter()
    if fmt == "gguf":
        from ..export.gguf_merge import check_gguf_weights

        report["gguf_weights"] = check_gguf_weights(merger, tmp / GGUF_NAME)
    if fmt == "mlx":
        from ..export.mlx_merge import check_mlx_weights

        report["mlx_weights"] = check_mlx_weights(merger, tmp)
    report["verification"] = verify(cfg, base, adapter_dir, tmp, fmt, device)
    if "refit" in report:
        report["verification"]["verdict"] = _refit_verdict(report["refit"]["summary"])
    report["seconds"]["verify"] = round(time.perf_counter() - t_verify, 2)


def _refit(cfg: RunConfig, base: Path, merger: LayerMerger, adapter_cfg: dict, show_progress: bool):
    """-> ({target: refitted weight}, {"summary", "layers"}) for a gptq export that keeps the fine-tune."""
    from ..export.gptq_refit import refit

    with block_progress(f"refitting {cfg.merge.rounding} on integer zeros", enabled=show_progress) as show:
        weights, rows, summary = refit(cfg, base, merger, adapter_cfg, resolve_device(cfg.merge.device),
                                         on_block=show)
    return weights, {"summary": summary, "layers": rows}


def _refit_verdict(s: dict) -> str:
    held, near = s["mean_heldout_rel_output_error"], s["mean_heldout_rel_output_error_nearest"]
    ratio = f"{held / near:.2f}x" if held is not None and near else "n/a"
    verdict = (f"integer zero points, {s['rounding']} refitted on {s['calibration']}: the layers' output error "
               f"against the exact merge on held-out windows is {ratio} that of plain rounding")
    d = s.get("distill")
    if d and d["heldout_kl_before"] is not None:
        verdict += (f"; then {d['steps']} steps of scale distillation took the held-out KL divergence from the exact "
                    f"merge from {d['heldout_kl_before']:.4f} to {d['heldout_kl_after']:.4f}")
        if d.get("kept", "distilled") != "distilled":
            verdict += ", so the refit's scales were kept"
    return verdict


def _every_tenth(show, total: int):
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        if done % 10 == 0 or done == total:
            show(done, total)
    return advance


def _rounding_summary(rows: list[dict]) -> dict:
    """Over all merged zero points (layers weighted by their number of zero points)."""
    n = sum(r["zero_points"] for r in rows)
    return {"max_zero_shift": max(r["max_zero_shift"] for r in rows),
            "mean_zero_shift": sum(r["mean_zero_shift"] * r["zero_points"] for r in rows) / n,
            "clamped_share": sum(r["clamped_share"] * r["zero_points"] for r in rows) / n}


def verify(cfg: RunConfig, base: Path, adapter_dir: Path, out: Path, fmt: str, device) -> dict:
    """Logits, greedy tokens and perplexity of the output against the unmerged model. Raises
    (so the output is removed) when an exact format is beyond float rounding."""
    from ..models.loading import load_tokenizer

    m = cfg.merge
    tokenizer = load_tokenizer(base)
    probe = make_probe(tokenizer, m.verify_prompts, m.verify_tokens, m.generate_tokens,
                       m.ppl_tokens)
    if fmt == "mlx":  # no perplexity where MLX runs on the CPU (too slow): mlx_merge.py says why
        from ..export.mlx_merge import mlx_probe

        probe = mlx_probe(probe)
    model = unmerged_model(base, adapter_dir, device)
    reference = run_probe(model, probe)
    del model
    gc.collect()
    if fmt == "mlx":  # torch cannot load it: mlx-lm runs the folder
        from ..export.mlx_merge import MLX_RELATIVE_TOLERANCE, run_mlx_probe

        merged = run_mlx_probe(out, probe)
    else:
        model = load_merged(out, fmt, device)
        merged = run_probe(model, probe)
        del model
        gc.collect()
    result = compare(reference, merged)
    tolerance = {"qalora": EXACT_RELATIVE_TOLERANCE, "gguf": GGUF_RELATIVE_TOLERANCE}.get(fmt)
    if fmt == "mlx":  # float16 rounding of the biases: mlx_merge.py says why this bound
        tolerance = MLX_RELATIVE_TOLERANCE
        if m.ppl_tokens and probe.ppl_ids is None:
            result["ppl_skipped"] = "MLX runs on the CPU here, too slowly for perplexity"
    result["tolerance"] = tolerance
    if tolerance is None:
        result["verdict"] = "lossy by construction (integer zero points): see ppl_change and zero_rounding"
    elif result["relative"] <= tolerance and torch.isfinite(torch.tensor(result["relative"])):
        result["verdict"] = "pass"
    else:
        raise UserError(f"verification failed: the merged model's logits differ from the unmerged model's by "
                        f"{result['relative']:.2e} of the largest logit (tolerance {tolerance:.0e}); "
                        "nothing was written")
    return result


def load_merged(out: Path, fmt: str, device):
    """The merged output as its users load it: the toolkit's loader for qalora and gptq, and
    transformers' GGUF loader (which dequantizes to float32) for gguf."""
    if fmt == "gguf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=GGUF_NAME, dtype=torch.float32)
        return model.to(device).eval()
    from ..models.quantized_io import load_quantized

    return load_quantized(out, device, torch.float32)[0]
