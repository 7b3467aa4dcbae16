"""The QA-LoRA layer. It wraps a quantized linear layer (never replaces it) and adds

    y = W~ x + (alpha / r) * B @ A @ pool(x)          A: [r, groups], B: [out, r]

where pool averages the input over each quantization group (by `g_idx`). Every weight of a
group (j, row o) therefore receives the same update, (alpha/r) (B A)[o, j] / g, which folds
exactly into that group's zero point: see lora/merge and docs/DESIGN.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .merge import group_delta
from .pooling import GroupPool


class QALoraLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        groups = base.scales.shape[0]
        self.pool = GroupPool(base.g_idx, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.scales.device
        # A starts random (PEFT's kaiming init) and B at zero: the untrained layer is the base.
        self.lora_A = nn.Parameter(torch.empty(rank, groups, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def groups(self) -> int:
        return self.lora_A.shape[1]

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A pool(x), the adapter's share of the output."""
        pooled = self.dropout(self.pool(x))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return (pooled.to(dtype) @ self.lora_A.to(dtype).t() @ self.lora_B.to(dtype).t()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.adapter_output(x).to(y.dtype)

    @torch.no_grad()
    def delta_groups(self) -> torch.Tensor:
        """[out, groups] float64: the update every weight of group j in row o receives,
        (alpha/r) (B A)[o, j] / g, with g the group's column count."""
        return group_delta(self.lora_A, self.lora_B, self.scaling, self.pool.counts)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, groups={self.groups}"
