"""One layer at a time: read a target layer's zero points, scales and g_idx from the base
checkpoint and its A and B from the adapter file, and give the merged zero points.

Everything an adapter can get wrong (a target the model lacks, a rank or a group count that
disagrees) is checked from tensor shapes alone, before anything is read or written."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..lora.adapter_io import ADAPTER_WEIGHTS
from ..lora.merge import merge_zero_points
from ..models.safetensors_stream import StreamReader
from ..quant.gptq_format import decode_qzeros
from .checkpoint_reader import CheckpointReader

LAYER_KEYS = ("qweight", "qzeros", "scales", "g_idx")


class LayerMerger:
    def __init__(self, base: CheckpointReader, adapter_dir: str | Path, adapter_config: dict, bits: int,
                 group_size: int):
        self.base, self.config, self.bits, self.group_size = base, adapter_config, bits, group_size
        self.targets: list[str] = list(adapter_config["targets"])
        self.scaling = float(adapter_config["scaling"])
        try:
            self._adapter = StreamReader(Path(adapter_dir) / ADAPTER_WEIGHTS)
        except Exception as e:
            raise UserError(f"'{Path(adapter_dir) / ADAPTER_WEIGHTS}': corrupt adapter weights: "
                            f"{first_line(e)}") from e
        self.check()

    def check(self) -> None:
        rank = self.config["rank"]
        if abs(self.scaling - self.config["alpha"] / rank) > 1e-9 * max(1.0, abs(self.scaling)):
            raise UserError(f"the adapter config's scaling {self.scaling} is not alpha / rank "
                            f"({self.config['alpha']} / {rank})")
        for t in self.targets:
            lacking = [k for k in LAYER_KEYS if f"{t}.{k}" not in self.base]
            if len(lacking) == len(LAYER_KEYS):
                raise UserError(f"the adapter targets {t}, which the model does not have as a quantized layer")
            if lacking:
                if f"{t}.zeros" in self.base:
                    raise UserError(f"{t} already holds a merged adapter (float zeros): merge onto the "
                                    "GPTQ base the adapter was trained on")
                raise UserError(f"{t} lacks {', '.join(lacking)} in the model's weights")
            self._check_layer(t)
            groups, out = self.base.shape(f"{t}.scales")
            for k in ("lora_A", "lora_B"):
                entry = self._adapter.entries.get(f"{t}.{k}")
                if entry is None or not entry[0].is_floating_point:
                    raise UserError(f"the adapter's weights lack a floating-point {t}.{k}")
            a = self._adapter.entries[f"{t}.lora_A"][1]
            b = self._adapter.entries[f"{t}.lora_B"][1]
            if a != (rank, groups) or b != (out, rank):
                raise UserError(f"adapter of {t}: A {a} and B {b} do not fit rank {rank} and the layer's "
                                f"{groups} groups x {out} outputs (group size {self.config['group_size']} in "
                                "the adapter)")

    def _check_layer(self, t: str) -> None:
        """The base layer's packed tensors agree with each other, bits and group size (a damaged
        checkpoint is refused here, before anything is written)."""
        shape, dtype = self.base.shape, self.base.dtype
        g_idx = shape(f"{t}.g_idx")
        in_f = g_idx[0] if len(g_idx) == 1 else -1
        qweight, qzeros, scales = shape(f"{t}.qweight"), shape(f"{t}.qzeros"), shape(f"{t}.scales")
        out = scales[1] if len(scales) == 2 else -1
        groups = -(-in_f // self.group_size) if self.group_size > 0 else 1
        fits = (in_f > 0 and out > 0 and qweight == (in_f * self.bits // 32, out) and scales == (groups, out)
                and qzeros == (groups, out * self.bits // 32) and dtype(f"{t}.qweight") == torch.int32
                and dtype(f"{t}.qzeros") == torch.int32 and dtype(f"{t}.g_idx") in (torch.int32, torch.int64)
                and dtype(f"{t}.scales").is_floating_point)
        if not fits:
            raise UserError(f"{t}: the model's packed tensors do not agree with each other or with {self.bits} bits, "
                            f"group size {self.group_size} (qweight {qweight}, qzeros {qzeros}, scales {scales}, "
                            f"g_idx {g_idx})")

    def zeros_before_after(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, z') [groups, out] of one target layer; z' in float64."""
        scales = self.base.get(f"{target}.scales").float()
        zeros = decode_qzeros(self.base.get(f"{target}.qzeros"), self.bits, scales.shape[1])
        a = self._adapter.get(f"{target}.lora_A")
        b = self._adapter.get(f"{target}.lora_B")
        g_idx = self.base.get(f"{target}.g_idx")
        if g_idx.numel() and not (0 <= int(g_idx.min()) and int(g_idx.max()) < scales.shape[0]):
            raise UserError(f"{target}.g_idx names groups outside 0..{scales.shape[0] - 1}: the model's weights are "
                            "damaged")
        return zeros, merge_zero_points(zeros, scales, g_idx, a, b, self.scaling, target)

    def close(self) -> None:
        self._adapter.close()

    def __enter__(self) -> "LayerMerger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
