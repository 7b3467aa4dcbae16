"""Refit a layer's scales, codes and integer zeros fixed, to match a target weight's output on
calibration inputs.

The GPTQ export of a merge must keep integer zero points, but its scales are free fp16 numbers.
Rounding z' to z_int leaves, in row o and group j, the error u = s (z_int - z') on every weight
of the group: small (most adapters move zeros by a few hundredths of a step) but systematic.
A scale change ds moves the group's weights by ds (q - z_int). Per row o, the ds of its groups
that best cancel the error on the inputs X (H = 2/N X X^T) solve the G x G system

    (V^T H V) ds = V^T H u,    V[k, j] = (q[o,k] - z_int[j,o]) if column k is in group j, else 0

where u is now the whole difference target - current weight of the row. V^T H V is built for
all rows at once from one product per group: A[o, j, l] = sum over k in j, m in l of
(q - z)[o,k] H[k,m] (q - z)[o,m], about out x in^2 multiply-adds in all.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .grid import expand_groups
from .result import QuantizedWeight


def _group_sum(x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """[out, in] -> [out, G]: the sum of each row over each group's columns."""
    return x @ onehot


def refit_scales(target: torch.Tensor, grid: QuantizedWeight, H: torch.Tensor,
                 damp_percent: float = 0.01) -> QuantizedWeight:
    """`grid` with each (group, row) scale moved so that s' (q - z) X best matches target X,
    rounded to fp16 as a GPTQ checkpoint stores it. Codes, zeros and g_idx are unchanged."""
    dev = H.device
    # The products in float32 (codes are small integers, H as accumulated); the solve in float64.
    H = H.float()
    g_idx = grid.g_idx.to(dev).long()
    G = grid.scales.shape[0]
    onehot = torch.nn.functional.one_hot(g_idx, G).float()                        # [in, G]
    qz = grid.codes.to(dev).float() - expand_groups(grid.zeros.to(dev).float(), g_idx)  # [out, in]
    u = (target.to(dev).double() - expand_groups(grid.scales.to(dev).double(), g_idx) * qz.double()).float()
    A = torch.empty(qz.shape[0], G, G, dtype=torch.float64, device=dev)
    for j in range(G):
        cols = (g_idx == j).nonzero().squeeze(1)
        A[:, j, :] = _group_sum((qz[:, cols] @ H[cols, :]) * qz, onehot).double()  # [out, G]
    b = _group_sum((u @ H) * qz, onehot).double()                                 # [out, G]
    # Damped as GPTQ damps H: groups whose inputs are dead or whose codes sit at z get ds = 0.
    diag = torch.diagonal(A, dim1=1, dim2=2)
    ridge = damp_percent * diag.mean(dim=1, keepdim=True).clamp_min(1e-30)
    A = A + torch.diag_embed(ridge.expand(-1, G))
    ds = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)                        # [out, G]
    scales = (grid.scales.to(dev).double() + ds.t()).to(torch.float16).float()
    bad = ~torch.isfinite(scales)
    scales = torch.where(bad, grid.scales.to(dev).float(), scales)
    return replace(grid, scales=scales.to(grid.scales.device))
