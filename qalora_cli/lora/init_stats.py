"""The statistics `lora.init` needs, and the init applied to a model's adapters.

A quantized checkpoint no longer holds the full-precision weights W, so the residual R = W - W~
is gone. What the init needs of it is small: per quantized layer C = R H E [out, L], G = E^T H E
[L, L], the per-group row mean of R [out, L] (for `svd`) and tr(R H R^T) (to report the share of
the output error corrected). `qalora quantize` computes them where W, W~ and H are all at hand and
writes them beside the checkpoint (STATS_NAME, safetensors, in a subfolder). A checkpoint without them gets them
recomputed from the original model its quantize_report.json records, through the same block-by-
block pass (the checkpoint's own weights stand in for GPTQ's choices), so both agree.

Which inputs X (`output.init_stats_inputs`):
- quantized: GPTQ's sequential H, the inputs the quantized model itself gives the layer, and the
  layer's own float weight as the target. Each layer's correction is solved on its own.
- corrected: a third stream in the block pass runs the model as the init corrects it (every finished
  layer W~ + Delta at lora.rank), and each layer aims at the float model's output for the same tokens
  (quant/asymmetric.py): the corrections add up instead of piling up, which they do when all of them
  aim at the float output from the uncorrected model's inputs.
QuAILoRA's full-precision inputs would score the correction on inputs the layer never gets.
Measured side by side: docs/BENCHMARKS.md, "QuAILoRA initialization".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..quant.result import QuantizedWeight
from . import init as init_math

# In a subfolder: runtimes that load every top-level *.safetensors of a folder (vLLM without an index) must not
# take it for weights, and merges (which copy the base's top-level side files) must not carry it to a merged
# model, whose W~ it no longer describes.
STATS_NAME = "qalora_init/quailora_stats.safetensors"
STATS_FORMAT = "qalora-init-stats"
_KEYS = ("C", "G", "R_mean", "rhr")


@dataclass
class LayerStats:
    C: torch.Tensor        # [out, L] R H E
    G: torch.Tensor        # [L, L]   E^T H E
    R_mean: torch.Tensor   # [out, L] per-group row mean of R
    rhr: float             # tr(R H R^T) = f(0)
    counts: torch.Tensor   # [L] columns per group


def layer_stats(target: torch.Tensor, approx: torch.Tensor, H: torch.Tensor, g_idx: torch.Tensor,
                groups: int) -> dict[str, torch.Tensor]:
    """The statistics of one layer, float32 tensors ready to store."""
    R = (target.double() - approx.double()).to(H.device)
    E = torch.nn.functional.one_hot(g_idx.long().to(H.device), groups).double()     # [in, L]
    HE = H.double() @ E
    counts = E.sum(0)
    return {"C": (R @ HE).float(), "G": (E.t() @ HE).float(), "R_mean": (R @ E / counts).float(),
            "rhr": ((R.float() @ H.float()) * R.float()).sum().double().reshape(1).float()}


def stats_rank(cfg) -> int | None:
    """The rank the statistics' corrected stream is corrected at; None: taken on the quantized model's inputs."""
    return cfg.lora.rank if cfg.output.init_stats_inputs == "corrected" else None


def inputs_label(rank: int | None) -> str:
    """Which inputs statistics were taken on, as the file's metadata and the init's report say it."""
    return f"corrected-sequential rank {rank}" if rank is not None else "quantized-sequential"


class StatsCollector:
    """The per-layer callback of quant.sequential.quantize_model (its LayerStatsHook): gathers every
    layer's statistics. `scale_dtype`: the dtype the checkpoint stores scales in, so W~ is the one
    the checkpoint holds. `rank`: take them on the corrected model's inputs (`corrects`), each
    finished layer corrected by the quailora init of this rank; None: on the quantized model's."""

    def __init__(self, scale_dtype: torch.dtype | None = None, rank: int | None = None):
        self.scale_dtype = scale_dtype
        self.rank = rank
        self.corrects = rank is not None
        self.tensors: dict[str, torch.Tensor] = {}

    def _stored(self, qw: QuantizedWeight) -> QuantizedWeight:
        return replace(qw, scales=qw.scales.to(self.scale_dtype).float()) if self.scale_dtype is not None else qw

    def __call__(self, name: str, target: torch.Tensor, qw: QuantizedWeight, H: torch.Tensor) -> torch.Tensor | None:
        qw = self._stored(qw)
        approx = qw.dequantize()
        if approx.shape != target.shape:
            raise UserError(f"{name}: the original model's weight is {tuple(target.shape)}, the checkpoint's "
                            f"{tuple(approx.shape)}: it was not quantized from this model")
        for key, value in layer_stats(target, approx, H, qw.g_idx, qw.scales.shape[0]).items():
            self.tensors[f"{name}.{key}"] = value.cpu().contiguous()
        return self._corrected(name, approx, qw.g_idx) if self.corrects else None

    def corrected_weight(self, name: str, qw: QuantizedWeight) -> torch.Tensor:
        """W~ + M E^T: the layer as the quailora init of rank `rank` corrects it, from its statistics."""
        qw = self._stored(qw)
        return self._corrected(name, qw.dequantize(), qw.g_idx)

    def _corrected(self, name: str, approx: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
        M = init_math.quailora_delta(self.tensors[f"{name}.C"], self.tensors[f"{name}.G"], self.rank)
        return approx.double() + M[:, g_idx.long()].to(approx.device)

    def inputs(self) -> str:
        return inputs_label(self.rank)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        path = Path(folder) / STATS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, path, metadata={"format": STATS_FORMAT, "version": "1", "inputs": self.inputs()})

    def layers(self) -> dict[str, LayerStats]:
        return _as_layers(self.tensors)


def _as_layers(tensors: dict[str, torch.Tensor]) -> dict[str, LayerStats]:
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    out = {}
    for n in names:
        if any(f"{n}.{k}" not in tensors for k in _KEYS):
            raise UserError(f"{STATS_NAME}: layer {n} lacks some of {', '.join(_KEYS)}; re-run `qalora quantize`")
        G = tensors[f"{n}.G"]
        out[n] = LayerStats(tensors[f"{n}.C"], G, tensors[f"{n}.R_mean"], float(tensors[f"{n}.rhr"].sum()),
                            torch.zeros(0))
    return out


def stored_inputs(base_dir: str | Path) -> str | None:
    """Which inputs the checkpoint's stored statistics were taken on (their metadata), if it has any."""
    from safetensors import safe_open

    try:
        with safe_open(Path(base_dir) / STATS_NAME, "pt") as f:
            return (f.metadata() or {}).get("inputs")
    except Exception:
        return None


def load_stats(base_dir: str | Path) -> dict[str, LayerStats] | None:
    """The checkpoint's stored statistics, or None when it has none."""
    path = Path(base_dir) / STATS_NAME
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("format") != STATS_FORMAT:
                raise UserError(f"'{path}' is not a qalora statistics file; remove it or re-run `qalora quantize`")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"'{path}': corrupt statistics file: {first_line(e)}; re-run `qalora quantize`") from e
    return _as_layers(tensors)


def _how_to(method: str, base_dir: Path, why: str) -> UserError:
    return UserError(f"lora.init={method} needs the quantization statistics: '{base_dir}' has no {STATS_NAME} and "
                     f"{why}; re-quantize with `qalora quantize` (it writes them), or use lora.init=zero")


def quantize_record(base_dir: Path) -> dict:
    """The checkpoint's quantize_report.json ({} when it has none or it is unreadable)."""
    try:
        report = json.loads((Path(base_dir) / "quantize_report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def source_model(cfg, base_dir: Path, method: str):
    """The ModelSection of the model the checkpoint was quantized from (its quantize_report.json)."""
    from ..config.schema import ModelSection
    from ..models.source import resolve_source

    recorded = quantize_record(base_dir).get("model")
    if not recorded:
        raise _how_to(method, base_dir, "no quantize_report.json records the original model")
    try:
        if cfg.model is not None and resolve_source(cfg.model).describe() == recorded:
            return cfg.model
    except UserError:
        pass
    section = ModelSection(name_or_path=recorded, dtype=cfg.model.dtype if cfg.model is not None else "float32")
    try:
        resolve_source(section)
    except UserError:
        raise _how_to(method, base_dir, f"the original model '{recorded}' cannot be found") from None
    return section


def recompute_stats(cfg, model_section, quantized: dict[str, QuantizedWeight], note=None,
                    rank: int | None = None) -> dict[str, LayerStats]:
    """The statistics of a checkpoint's layers (`quantized`, its own weights), from the original model and
    this config's calibration section, by the block-by-block pass `quantize` runs. `rank`: on the
    corrected model's inputs (StatsCollector)."""
    from ..data.calibration import calibration_batches
    from ..device import resolve_device
    from ..models.loading import load_model
    from ..quant.sequential import quantize_model

    model, tokenizer, _ = load_model(model_section, "cpu")
    device = resolve_device(cfg.quantize.device)
    calib = calibration_batches(cfg.calibration, tokenizer, model, device, note=note)
    collector = StatsCollector(rank=rank)

    def checkpoint_weight(name, _target, _H, _held):
        if name not in quantized:
            raise UserError(f"the original model's layer {name} is not quantized in the checkpoint: it was not "
                            "quantized from this model")
        return quantized[name], None

    quantize_model(model, calib, cfg.quantize, device, quantize_layer=checkpoint_weight, layer_stats=collector)
    return collector.layers()


def quantized_weights(adapters: dict) -> dict[str, QuantizedWeight]:
    return {n: m.base.quantized_weight() for n, m in adapters.items()}


def get_stats(cfg, base_dir: Path, adapters: dict, note=None) -> tuple[dict[str, LayerStats], str]:
    """(the statistics of every adapted layer, where they came from)."""
    method = cfg.lora.init
    stats = load_stats(base_dir)
    where = STATS_NAME
    if stats is None:
        section = source_model(cfg, base_dir, method)
        if note:
            note(f"lora.init={method}: no {STATS_NAME} in '{base_dir}'; recomputing it from {section.name_or_path}")
        try:
            stats = recompute_stats(cfg, section, quantized_weights(adapters), note=note, rank=stats_rank(cfg))
        except UserError as e:
            if str(e).startswith("could not load the model"):
                raise _how_to(method, base_dir, str(e)) from None
            raise
        where = f"recomputed from {section.name_or_path}"
    missing = [n for n in adapters if n not in stats]
    if missing:
        raise UserError(f"{where} has no statistics for {missing[0]} (and {len(missing) - 1} more); "
                        "re-run `qalora quantize`")
    return stats, where


@torch.no_grad()
def initialize_adapters(cfg, base_dir: str | Path, adapters: dict, note=None,
                        given: tuple[dict[str, LayerStats], str] | None = None) -> dict:
    """Set every adapter's A and B to `cfg.lora.init`. -> the init's report (zero: nothing to do).
    `given`: (statistics, their origin) to use instead of the checkpoint's (benchmarks compare inputs)."""
    method = cfg.lora.init
    if method == "zero":
        return {"method": "zero"}
    t0 = time.perf_counter()
    stats, where = given or get_stats(cfg, Path(base_dir), adapters, note)
    t_stats = time.perf_counter()
    layers, remaining, limit, f_sum = [], [], [], [0.0, 0.0]
    for name, m in adapters.items():
        st, counts = stats[name], m.pool.counts.cpu()
        if st.C.shape != (m.out_features, m.groups) or st.G.shape != (m.groups, m.groups):
            raise UserError(f"{where}: the statistics of {name} are {tuple(st.C.shape)}, the layer has "
                            f"{m.out_features} outputs and {m.groups} groups; re-run `qalora quantize`")
        if method == "svd":
            M = init_math.svd_delta(st.R_mean, counts, m.rank)
        else:
            M = init_math.quailora_delta(st.C, st.G, m.rank)
        A, B = init_math.adapter_factors(M, counts, m.scaling, m.lora_A)
        m.lora_A.copy_(A.to(m.lora_A))
        m.lora_B.copy_(B.to(m.lora_B))
        f0 = max(st.rhr, 1e-30)
        share = init_math.objective(M, st.C, st.G, st.rhr) / f0
        best = init_math.objective(init_math.full_rank_delta(st.C, st.G), st.C, st.G, st.rhr) / f0
        remaining.append(share)
        limit.append(best)
        f_sum[0] += share * f0
        f_sum[1] += f0
        layers.append({"layer": name, "remaining_error": round(share, 5), "full_rank_remaining_error": round(best, 5)})
    n = max(1, len(layers))
    inputs = (stored_inputs(base_dir) if where == STATS_NAME else where if given
              else f"recomputed, {inputs_label(stats_rank(cfg))}")
    return {"method": method, "stats": where, "stats_inputs": inputs, "seconds": round(time.perf_counter() - t0, 2),
            "seconds_stats": round(t_stats - t0, 2),
            # f(M)/f(0) per layer, |(R - Delta) X|^2 / |R X|^2 on the calibration inputs: 1 is zero init's
            "mean_remaining_error": sum(remaining) / n, "mean_full_rank_remaining_error": sum(limit) / n,
            # the same over all layers' errors summed: the few layers with large errors weigh more
            "total_remaining_error": f_sum[0] / max(f_sum[1], 1e-30),
            "layers": layers}
