"""The random quantized weights and the float64 reference that the kernel tests (Triton kernels
and the Triton backend) check against."""

from __future__ import annotations

import torch

from qalora_cli.quant.result import QuantizedWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative error (max |diff| / max |reference|) allowed per input dtype: the reference is
# float64; the kernels round W~ to the input dtype (as the torch backend does) and accumulate
# in float32.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_weight(out_f: int, in_f: int, bits: int, group_size: int, layout: str, zero_kind: str,
                  seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    groups = in_f // gs
    if layout == "act_order":   # groups scattered over the columns, as desc_act leaves them
        g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f, generator=g)]
    else:
        g_idx = torch.arange(in_f) // gs
    top = 2 ** bits - 1
    codes = torch.randint(0, top + 1, (out_f, in_f), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, out_f, generator=g) * 0.02 + 0.001).half().float()
    if zero_kind == "int":
        zeros = torch.randint(0, top + 1, (groups, out_f), generator=g).float()
    else:   # merged: fractional, even outside the code range
        zeros = torch.rand(groups, out_f, generator=g) * (top + 2) - 1
    return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), bits, group_size)


def reference(qw: QuantizedWeight) -> torch.Tensor:
    """W~ [in, out] in float64, straight from the definition."""
    g = qw.g_idx.long()
    s = qw.scales.double()[g]                      # [in, out]
    z = qw.zeros.double()[g]
    return s * (qw.codes.t().double() - z)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want).abs().max() / want.abs().max())
