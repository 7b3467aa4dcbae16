"""The quantization grid: group-wise asymmetric (or symmetric) min/max parameters.

One convention everywhere (docs/DESIGN.md, "The math"):  W~ = s * (q - z),  q = clamp(round(W/s) + z, 0, 2^b-1).
As in GPTQ, the range always contains 0 (min <= 0 <= max); z is an integer in [1, 2^b-1].
"""

from __future__ import annotations

import torch


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def fit_params(w: torch.Tensor, bits: int, sym: bool = False,
               clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of `w` [rows, cols] over all its columns (one group).

    With `clip_search`, the range is also shrunk by factors 1.00, 0.99, ... 0.80 and each row
    keeps the one with the least |W - W~|^2.4 (GPTQ's `mse` grid): clipping a few outliers
    buys a finer grid for the rest."""
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row: any positive scale works
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale, zero = _params_for_range(xmin, xmax, bits, sym)
    if not clip_search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for shrink in torch.linspace(1.0, 0.8, 21).tolist():
        s, z = _params_for_range(xmin * shrink, xmax * shrink, bits, sym)
        err = (dequantize(quantize_codes(w, s[:, None], z[:, None], bits), s[:, None], z[:, None]) - w)
        err = err.abs().pow(2.4).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _params_for_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    maxq = max_code(bits)
    scale = (xmax - xmin) / maxq
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    # GPTQ v1 checkpoints store z - 1 and readers add 1 back with a carry across the packed
    # word, so z = 0 cannot be stored. A group whose zero would round to 0 (nearly all
    # positive) gets z = 1 and the scale max / (2^b - 2) instead: its grid still covers it.
    low = zero < 1
    scale = torch.where(low, xmax / (maxq - 1), scale)
    zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid; scale/zero broadcast against `w`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (codes - zero)


def expand_groups(per_group: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """[groups, out] -> [out, in]: the parameter that applies to each weight."""
    return per_group[g_idx.long()].t()
