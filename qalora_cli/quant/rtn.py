"""Round-to-nearest: the baseline GPTQ must beat. Contiguous groups, no calibration needed."""

from __future__ import annotations

import torch

from .grid import fit_params, quantize_codes
from .groups import contiguous_g_idx, num_groups
from .result import QuantizedWeight


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = False,
                 clip_search: bool = False) -> QuantizedWeight:
    w = weight.float()
    out_f, in_f = w.shape
    n_groups = num_groups(in_f, group_size)
    g = in_f if group_size == -1 else group_size
    wg = w.reshape(out_f, n_groups, g)
    scale, zero = fit_params(wg.permute(1, 0, 2).reshape(n_groups * out_f, g), bits, sym, clip_search)
    scale = scale.reshape(n_groups, out_f)
    zero = zero.reshape(n_groups, out_f)
    codes = quantize_codes(wg, scale.t().unsqueeze(-1), zero.t().unsqueeze(-1), bits)
    return QuantizedWeight(
        codes=codes.reshape(out_f, in_f).to(torch.uint8),
        scales=scale,
        zeros=zero,
        g_idx=contiguous_g_idx(in_f, group_size),
        bits=bits,
        group_size=group_size,
    )
