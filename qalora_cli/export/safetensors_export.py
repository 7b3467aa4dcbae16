"""The merged checkpoint in the qalora format (float zero points: exact) or as standard GPTQ
(integer zero points: rounded and clamped, and the loss reported), written shard by shard and
tensor by tensor, so the merge holds about one layer in memory whatever the model's size.

Shards keep the base's names and contents; only a target layer's zero points change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..lora.adapter_io import merged_adapter_record
from ..lora.merge import round_zeros
from ..models.quantized_io import MERGED_QUANT_METHOD
from ..models.safetensors_stream import StreamWriter
from ..quant.gptq_format import encode_qzeros, to_gptq_tensors
from ..quant.result import QuantizedWeight
from .layer_merge import LayerMerger

INDEX = "model.safetensors.index.json"
GPTQ_SIDE_CONFIG = "quantize_config.json"
FORMATS = ("qalora", "gptq", "gguf", "mlx")


def write_merged_safetensors(merger: LayerMerger, out_dir: Path, fmt: str, on_layer=None,
                             refitted: dict[str, QuantizedWeight] | None = None) -> list[dict]:
    """Write every shard of the merged model into `out_dir`. -> one report row per merged layer.

    `refitted` (gptq only): each target's integer-zero weight from export/gptq_refit.py, whose
    codes and scales replace the base's; without it the zeros are rounded and the rest kept."""
    reader, bits = merger.base, merger.bits
    targets = set(merger.targets)
    rows, weight_map, total = [], {}, 0
    for f in reader.files:
        entries = []  # (output name, dtype, shape, source key, merged layer or None)
        for key in reader.keys_in(f):
            prefix, _, leaf = key.rpartition(".")
            if refitted and leaf in ("qweight", "scales") and prefix in targets:
                entries.append((key, reader.dtype(key), reader.shape(key), key, (leaf, prefix)))
            elif leaf == "qzeros" and prefix in targets:
                groups, out = reader.shape(f"{prefix}.scales")
                if fmt == "qalora":
                    entries.append((f"{prefix}.zeros", torch.float32, (groups, out), key, prefix))
                else:
                    entries.append((key, torch.int32, reader.shape(key), key, prefix))
            else:
                entries.append((key, reader.dtype(key), reader.shape(key), key, None))
        entries.sort(key=lambda e: e[0])
        with StreamWriter(out_dir / f.name, [e[:3] for e in entries], reader.metadata(f)) as w:
            for name, _, _, key, layer in entries:
                if layer is None:
                    w.write(name, reader.get(key))
                    continue
                if isinstance(layer, tuple):  # refitted codes or scales
                    leaf, prefix = layer
                    w.write(name, to_gptq_tensors(refitted[prefix], prefix)[leaf].to(reader.dtype(key)))
                    continue
                z, z_merged = merger.zeros_before_after(layer)
                row = {"layer": layer, "zero_points": z.numel(),
                       "max_zero_move": round(float((z_merged - z).abs().max()), 6)}
                if fmt == "qalora":
                    w.write(name, z_merged.float())
                else:
                    z_int, loss = round_zeros(z_merged, bits)
                    # the codes and scales written with it were fitted to exactly these zeros
                    assert not refitted or torch.equal(z_int.float(), refitted[layer].zeros.float()), layer
                    w.write(name, encode_qzeros(z_int, bits, layer))
                    row.update(loss.as_dict())
                rows.append(row)
                if on_layer:
                    on_layer()
        weight_map.update({e[0]: f.name for e in entries})
        total += w.data_bytes
    if (reader.path / INDEX).is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return rows


def merged_quantization_config(base_qc: dict, fmt: str, adapter_config: dict, base_sha256: str) -> dict:
    merged = merged_adapter_record(adapter_config, base_sha256)
    if fmt == "qalora":
        return {
            "quant_method": MERGED_QUANT_METHOD,
            "format": "qalora-merged",
            "version": 1,
            "bits": base_qc["bits"],
            "group_size": base_qc["group_size"],
            "desc_act": base_qc.get("desc_act", False),
            "sym": False,
            "zero_points": "merged layers: float32 `zeros` [groups, out], w = s (q - z); "
                           "others: GPTQ v1 packed `qzeros`",
            "merged_adapter": merged,
        }
    qc = dict(base_qc)
    # The merged zeros are no longer symmetric whatever the base was.
    qc.update({"sym": False, "qalora_merged_adapter": merged})
    return qc


def write_side_files(base_dir: Path, out_dir: Path, quantization_config: dict, fmt: str) -> None:
    """config.json with the new quantization_config; the tokenizer and the rest copied."""
    weights = {p.name for p in base_dir.glob("*.safetensors")} | {INDEX}
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and p.name not in weights and p.name not in ("config.json", GPTQ_SIDE_CONFIG):
            shutil.copy2(p, out_dir / p.name)
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "gptq":  # GPTQModel and older AutoGPTQ readers look for it; the qalora format must not have it
        (out_dir / GPTQ_SIDE_CONFIG).write_text(json.dumps(quantization_config, indent=2) + "\n")
