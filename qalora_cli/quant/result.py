"""What quantizing one linear layer produces: codes and the grid, laid out as docs/DESIGN.md
("The math") says."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import expand_groups


@dataclass
class QuantizedWeight:
    codes: torch.Tensor   # uint8 [out, in], values in [0, 2^bits - 1] (any integer dtype given is stored so)
    scales: torch.Tensor  # float32 [groups, out]
    zeros: torch.Tensor   # float32 [groups, out]; integers after quantization, fractional after merge
    g_idx: torch.Tensor   # int32 [in]: the group of each input column
    bits: int
    group_size: int       # -1 for per-channel (one group)

    def __post_init__(self):
        # A quantize run holds every layer's codes until the end: at one byte a weight a 70B
        # model's take 65 GiB, where int32 took 260 (docs/RELIABILITY.md, the memory plan).
        if self.codes.dtype != torch.uint8:
            if self.codes.is_floating_point():
                raise TypeError(f"codes must be integers, got {self.codes.dtype}")
            self.codes = self.codes.to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """W~ [out, in] in float32."""
        s = expand_groups(self.scales, self.g_idx)
        z = expand_groups(self.zeros, self.g_idx)
        return s * (self.codes.float() - z)
