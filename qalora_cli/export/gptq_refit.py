"""The GPTQ export that keeps the fine-tune: integer zero points, scales (and codes) refitted.

Rounding the merged zero points z' to integers alone moves every weight of a group by up to
half a step, in the direction that undoes the adapter: it loses the whole fine-tune, since
most adapter shifts are a small fraction of a step. Here z_int = round(z'), and then, so that
each layer's output s' (q' - z_int) X matches the exact merge's s (q - z') X on calibration
inputs (`merge.rounding`):
  - scales: each (group, row) fp16 scale is refitted by least squares (quant/scale_refit.py):
    as many free numbers as the zero points that were lost, and continuous, so the small
    shifts survive;
  - codes: the codes are re-chosen by GPTQ's error feedback on the fixed grid (a fractional
    shift carried by a few code changes where the inputs make them count);
  - scales+codes: one, then the other.
It runs block by block through the model as `qalora quantize` does, each layer seeing the
outputs of the layers already refitted (quant/sequential.py), and holds the model densely in
float32 as quantization does.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config.schema import DataSection, MergeSection, QuantizeSection, RunConfig
from ..errors import UserError
from ..kernels.torch_quant_linear import TorchQuantLinear
from ..lora.merge import round_zeros
from ..quant.gptq import gptq_quantize, output_error
from ..quant.result import QuantizedWeight
from ..quant.scale_refit import refit_scales
from ..quant.sequential import quantize_model
from .layer_merge import LayerMerger
from ..models.modules import set_module



def dense_merged_model(base: Path, merger: LayerMerger, device) -> tuple[nn.Module, dict, dict, dict]:
    """The exactly merged model with plain float32 nn.Linear layers (what quantize_model walks),
    -> (model, {target: the fixed grid (scales, z_int; base codes)}, {target: zero rounding},
    {other quantized layer: its weight, kept as it is})."""
    from ..models.quantized_io import load_quantized

    model, _ = load_quantized(base, "cpu", torch.float32)
    grids, rounding, untouched = {}, {}, {}
    targets = set(merger.targets)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, TorchQuantLinear):
            continue
        qw = mod.quantized_weight()
        if name in targets:
            _, z_merged = merger.zeros_before_after(name)
            z_int, loss = round_zeros(z_merged, merger.bits)
            grids[name] = replace(qw, zeros=z_int.float())
            rounding[name] = loss.as_dict()
            qw = replace(qw, zeros=z_merged)
        else:
            untouched[name] = qw
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data = qw.dequantize().float()  # float64 zeros -> the exact merge, in float32
        if mod.bias is not None:
            lin.bias.data = mod.bias.data.float()
        set_module(model, name, lin)
    return model.to(device), grids, rounding, untouched


def _stream_windows(stream: torch.Tensor, starts: list[int], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """n windows of seq_len tokens from `stream`, each beginning at one of `starts` (seeded)."""
    usable = [s for s in starts if s + seq_len <= stream.numel()]
    if not usable:
        raise UserError(f"too little calibration data for windows of {seq_len} tokens "
                        f"({stream.numel()} tokens); lower merge.calibration_seq_len")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(usable), (n,), generator=g).tolist()
    return torch.stack([stream[usable[i]:usable[i] + seq_len] for i in pick])


def data_windows(data: DataSection, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Windows of the adapter's training examples, concatenated, each starting at an example."""
    from ..data.instruct import load_records, tokenize_records

    records, _, _ = load_records(data)
    examples, _ = tokenize_records(records, tokenizer, data)
    starts, ids = [], []
    for ex in examples:
        starts.append(len(ids))
        ids += ex.input_ids
    return _stream_windows(torch.tensor(ids, dtype=torch.long), starts, n, seq_len, seed)


def text_windows(cfg: RunConfig, tokenizer, n: int, seq_len: int, seed: int) -> torch.Tensor:
    from ..data.calibration import calibration_batches

    c = cfg.calibration.model_copy(update={"num_samples": n, "seq_len": seq_len, "seed": seed})
    return calibration_batches(c, tokenizer)


def adapter_data(adapter_cfg: dict, cfg: RunConfig) -> tuple[DataSection, str]:
    """The data the adapter was trained on, as its config records it (else this run's)."""
    recorded = adapter_cfg.get("data")
    if recorded:
        return DataSection.model_validate(recorded), "the adapter's training data (adapter_config.json)"
    return cfg.data, "the run config's data section (the adapter records none)"


def calibration_ids(cfg: RunConfig, adapter_cfg: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor, str]:
    """-> (windows to choose the codes on, held-out windows to report on, what they are)."""
    m = cfg.merge
    n, held = m.calibration_samples, m.heldout_samples
    parts, described = [], []
    if m.calibration in ("data", "mix"):
        data, where = adapter_data(adapter_cfg, cfg)
        k = n + held if m.calibration == "data" else (n + held + 1) // 2
        parts.append(data_windows(data, tokenizer, k, m.calibration_seq_len, cfg.calibration.seed))
        described.append(where)
    if m.calibration in ("text", "mix"):
        k = n + held - (parts[0].shape[0] if parts else 0)
        parts.append(text_windows(cfg, tokenizer, k, m.calibration_seq_len, cfg.calibration.seed))
        from ..data.calibration import describe

        described.append(describe(cfg.calibration))
    ids = torch.cat(parts)
    # Interleave (a mix alternates sources), then the last `held` windows are held out.
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(cfg.calibration.seed + 1))
    ids = ids[order]
    return ids[:n], ids[n:], " + ".join(described)


def refit(cfg: RunConfig, base: Path, merger: LayerMerger, adapter_cfg: dict, device,
          on_block=None) -> tuple[dict[str, QuantizedWeight], list[dict], dict]:
    """-> ({target: refitted weight with integer zeros}, report rows, summary)."""
    from ..models.loading import load_tokenizer

    t0 = time.perf_counter()
    m: MergeSection = cfg.merge
    tokenizer = load_tokenizer(base)
    calib, heldout, described = calibration_ids(cfg, adapter_cfg, tokenizer)
    model, grids, rounding, untouched = dense_merged_model(base, merger, device)
    q = QuantizeSection(bits=merger.bits, group_size=merger.group_size, damp_percent=cfg.quantize.damp_percent,
                        batch_size=cfg.quantize.batch_size, true_sequential=m.refit_sequential)
    nearest_err: dict[str, tuple[float, float | None]] = {}

    def refit_layer(name: str, target: torch.Tensor, H: torch.Tensor, H_held: torch.Tensor | None):
        if name in untouched:  # not a target: its codes stay
            return untouched[name], None
        # the layer still holds the exact merge: the driver replaces it only after this returns
        grid, w = grids[name], model.get_submodule(name).weight.data
        nearest = grid.dequantize().to(H.device)
        nearest_err[name] = (output_error(w, nearest, H),
                             output_error(w, nearest, H_held) if H_held is not None else None)
        qw, damp = grid, None
        if "scales" in m.rounding:
            qw = refit_scales(target, qw, H, q.damp_percent)
        if "codes" in m.rounding:
            qw, stats = gptq_quantize(target, H, grid.bits, grid.group_size, damp_percent=q.damp_percent,
                                      act_order=m.codes_act_order, grid=qw)
            damp = stats.damp_percent
        return qw, damp

    results, reports = quantize_model(model, calib, q, device, on_block=on_block, quantize_layer=refit_layer,
                                      heldout_ids=heldout if heldout.shape[0] else None,
                                      asymmetric=m.refit_target == "exact")
    rows = []
    for r in reports:
        if r.name in untouched:
            continue
        qw, grid = results[r.name], grids[r.name]
        changed = (qw.codes != grid.codes)
        rel_scale = ((qw.scales - grid.scales).abs() / grid.scales.abs().clamp_min(1e-12))
        rows.append({"layer": r.name, **rounding[r.name], "codes": changed.numel(),
                     "codes_changed": int(changed.sum()), "codes_changed_share": float(changed.double().mean()),
                     "scales_changed_share": float((qw.scales != grid.scales).double().mean()),
                     "mean_rel_scale_change": float(rel_scale.mean()),
                     "rel_output_error_nearest": nearest_err[r.name][0], "rel_output_error": r.rel_output_error,
                     "heldout_rel_output_error_nearest": nearest_err[r.name][1],
                     "heldout_rel_output_error": r.heldout_rel_output_error})
    refitted = {k: v for k, v in results.items() if k in grids}
    summary = _summary(rows)
    if m.distill_steps and "scales" in m.rounding:  # the scales are what it tunes
        refitted, summary["distill"] = _distill(model, base, merger, refitted, calib, heldout, m, cfg.calibration.seed,
                                                device, on_block)
    summary.update({"rounding": m.rounding, "calibration": described, "samples": int(calib.shape[0]), "heldout_samples": int(heldout.shape[0]),
                    "seq_len": m.calibration_seq_len, "act_order": m.codes_act_order, "target": m.refit_target,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return refitted, rows, summary


def _distill(student: nn.Module, base: Path, merger: LayerMerger, refitted: dict, calib: torch.Tensor,
             heldout: torch.Tensor, m: MergeSection, seed: int, device, on_block) -> tuple[dict, dict]:
    """The end-to-end scale tuning (scale_distill.py) against the exact merge as the teacher;
    `student` is the dense model the block pass left holding the refitted weights."""
    from .scale_distill import distill_scales

    teacher = dense_merged_model(base, merger, device)[0]
    student.to(device)  # the block pass may have left blocks on the CPU

    def step(done: int, total: int) -> None:
        if on_block and (done % 4 == 0 or done == total):
            on_block(done, total, "distilling the scales")
    try:
        return distill_scales(student, teacher, refitted, calib, heldout, m.distill_steps, m.distill_lr,
                              m.distill_batch, seed, on_step=step, schedule=m.distill_schedule)
    finally:
        del teacher


def _summary(rows: list[dict]) -> dict:
    n_codes = sum(r["codes"] for r in rows) or 1

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None
    return {"layers": len(rows), "codes_changed": sum(r["codes_changed"] for r in rows),
            "codes_changed_share": sum(r["codes_changed"] for r in rows) / n_codes,
            "scales_changed_share": mean("scales_changed_share"), "mean_rel_scale_change": mean("mean_rel_scale_change"),
            "mean_rel_output_error_nearest": mean("rel_output_error_nearest"),
            "mean_rel_output_error": mean("rel_output_error"),
            "mean_heldout_rel_output_error_nearest": mean("heldout_rel_output_error_nearest"),
            "mean_heldout_rel_output_error": mean("heldout_rel_output_error")}
