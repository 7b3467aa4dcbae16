"""Group pooling: the input x [..., in] becomes [..., groups], the mean of the columns of each
quantization group. Groups come from `g_idx`, never from contiguous slices, so act-order
checkpoints (where a group's columns are scattered) pool exactly the columns that share a
scale and zero point: that is what makes the merge exact.
"""

from __future__ import annotations

import torch

from ..quant.groups import GroupLayout


class GroupPool(torch.nn.Module):
    """Mean of x over the columns of each group. Built once per layer from its `g_idx`."""

    def __init__(self, g_idx: torch.Tensor, groups: int):
        super().__init__()
        g_idx = g_idx.long()
        layout = GroupLayout(g_idx, groups)
        counts = layout.counts
        if (counts == 0).any():
            raise ValueError(f"g_idx leaves group(s) {torch.nonzero(counts == 0).flatten().tolist()[:5]} empty")
        self.groups = groups
        self.contiguous, self.equal_sizes = layout.contiguous, layout.equal_sizes
        # Columns sorted by group (a stable sort keeps the order within a group): a gather,
        # then a reshape and a mean, which autograd and every backend do well.
        self.register_buffer("order", layout.order, persistent=False)
        self.register_buffer("g_idx", g_idx, persistent=False)
        self.register_buffer("counts", counts, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, width = x.shape[:-1], x.shape[-1]
        if self.contiguous:
            return x.reshape(*lead, self.groups, width // self.groups).mean(-1)
        if self.equal_sizes:
            return x.index_select(-1, self.order).reshape(*lead, self.groups, width // self.groups).mean(-1)
        summed = x.new_zeros(*lead, self.groups).index_add_(-1, self.g_idx, x)
        return summed / self.counts.to(x.dtype)
