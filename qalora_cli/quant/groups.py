"""Which input columns form a group, and the checks that a group size fits a layer."""

from __future__ import annotations

import torch

from ..errors import UserError


def check_group_size(in_features: int, group_size: int, layer: str) -> None:
    if group_size == -1:
        return
    if group_size <= 0 or in_features % group_size:
        raise UserError(
            f"group size {group_size} does not divide the input width {in_features} of layer "
            f"'{layer}'; choose a group size that divides it (or -1 for per-channel)"
        )


def contiguous_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return torch.arange(in_features, dtype=torch.int32) // group_size


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


class GroupLayout:
    """How a layer's `g_idx` arranges its groups, worked out once: whether they are contiguous
    (k // g), their sizes, and the column order (a stable sort by group) that makes them so.
    The QuantLinear, the QA-LoRA pooling and the PEFT conversion all read it from here."""

    def __init__(self, g_idx: torch.Tensor, groups: int | None = None):
        g = g_idx.long()
        n = g.numel()
        self.groups = int(g.max()) + 1 if groups is None else groups
        self.counts = torch.bincount(g, minlength=self.groups)
        self.contiguous = bool(torch.equal(g, torch.arange(n, device=g.device) * self.groups // n))
        self.equal_sizes = n % self.groups == 0 and bool((self.counts == n // self.groups).all())
        self.order = torch.argsort(g, stable=True)
