"""The merged model as GGUF Q4_1: every quantized linear of the base, with the adapter folded
into the zero points of its targets, streamed from the checkpoint into gguf_writer.py."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..quant.gptq_format import decode_qzeros
from ..quant.groups import GroupLayout
from ..quant.pack import unpack_rows
from ..quant.result import QuantizedWeight
from .gguf_verify import verify_gguf_weights
from .gguf_writer import write_gguf
from .layer_merge import LayerMerger

_QUANT_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def _order(name: str) -> tuple:
    """Embeddings, then the blocks in order, then the rest: the order llama.cpp writes."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if "embed" in name else 2, 0, name)


def gguf_tensor_list(merger: LayerMerger) -> list[tuple[str, tuple[int, ...], str]]:
    reader, entries = merger.base, []
    for key in reader.file_of:
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            entries.append((f"{prefix}.weight", (reader.shape(f"{prefix}.scales")[1], reader.shape(f"{prefix}.g_idx")[0]),
                            "quantized"))
        elif not key.endswith(_QUANT_PARTS):
            entries.append((key, reader.shape(key), "float"))
    return sorted(entries, key=lambda e: _order(e[0]))


def merged_loader(merger: LayerMerger, rows: list[dict] | None = None, on_layer=None):
    """name -> the float tensor, or the layer's QuantizedWeight with merged zero points."""
    reader, bits, targets = merger.base, merger.bits, set(merger.targets)

    def load(name: str):
        if name in reader:
            return reader.get(name)
        prefix = name[: -len(".weight")]
        scales, g_idx = reader.get(f"{prefix}.scales").float(), reader.get(f"{prefix}.g_idx")
        if not GroupLayout(g_idx, scales.shape[0]).contiguous:
            raise UserError(f"{prefix}: its groups are not contiguous (act-order), which Q4_1 cannot hold: "
                            "use --format qalora or gptq")
        if prefix in targets:
            z, zeros = merger.zeros_before_after(prefix)
            if rows is not None:
                rows.append({"layer": prefix, "max_zero_move": round(float((zeros - z).abs().max()), 6)})
                if on_layer:
                    on_layer()
        else:
            zeros = decode_qzeros(reader.get(f"{prefix}.qzeros"), bits, scales.shape[1])
        codes = unpack_rows(reader.get(f"{prefix}.qweight"), bits, g_idx.shape[0]).t().contiguous()
        return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), bits, merger.group_size)

    return load


def _config_and_tokenizer(base: Path):
    from transformers import AutoConfig

    from ..errors import UserError
    from ..models.loading import load_tokenizer

    try:
        config = AutoConfig.from_pretrained(base)
    except Exception as e:  # a damaged config.json
        raise UserError(f"'{base / 'config.json'}' could not be read: {first_line(e)}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, load_tokenizer(base)


def write_merged_gguf(merger: LayerMerger, base: Path, out_file: Path, float_type: str, on_layer=None) -> list[dict]:
    config, tokenizer = _config_and_tokenizer(base)
    rows: list[dict] = []
    write_gguf(out_file, config, tokenizer, gguf_tensor_list(merger), merged_loader(merger, rows, on_layer),
               float_2d=float_type)
    return rows


def check_gguf_weights(merger: LayerMerger, out_file: Path) -> dict:
    """Read the file back with the gguf package: every weight equals the exact merge up to the
    fp16 rounding of m = -s z'."""
    names = [e[0] for e in gguf_tensor_list(merger)]
    return verify_gguf_weights(out_file, merged_loader(merger), names)
