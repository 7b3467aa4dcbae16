"""The QA-LoRA merge as pure functions on tensors (docs/DESIGN.md, "The exact merge").

The adapter adds the same value to every weight of group j in row o,

    delta[o, j] = (alpha / r) (B A)[o, j] / g_j          (g_j: the group's column count)

and s (q - z') = s (q - z) + delta  <=>  z' = z - delta / s. Codes and scales stay as they are.
Everything is computed in float64; z' is fractional, so the exact result keeps it as a float,
and a GPTQ export (integer zeros) rounds and clamps it: `round_zeros` says how much that loses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from ..quant.grid import max_code
from ..quant.result import QuantizedWeight


def group_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, counts: torch.Tensor) -> torch.Tensor:
    """[out, groups] float64: the update each weight of (row o, group j) receives."""
    ba = lora_B.double() @ lora_A.double()
    return ba * scaling / counts.double().to(ba.device)


def merged_zeros(zeros: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """z' [groups, out] float64 = z - delta^T / s."""
    s = scales.double()
    return zeros.double() - delta.t() / s


def merge_zero_points(zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, lora_A: torch.Tensor,
                      lora_B: torch.Tensor, scaling: float, layer: str = "layer") -> torch.Tensor:
    """z' [groups, out] float64 for one layer, refusing what cannot be merged."""
    counts = torch.bincount(g_idx.long(), minlength=scales.shape[0])
    delta = group_delta(lora_A, lora_B, scaling, counts)
    if not torch.isfinite(delta).all():
        raise UserError(f"{layer}: the adapter holds NaN or infinite values; nothing was written")
    dead = (delta.t() != 0) & (scales == 0)
    if dead.any():
        raise UserError(f"{layer}: {int(dead.sum())} group(s) have scale 0, so their zero point cannot "
                        "absorb the adapter's update; nothing was written")
    z = merged_zeros(zeros, torch.where(scales == 0, torch.ones_like(scales), scales), delta)
    if not torch.isfinite(z).all():
        raise UserError(f"{layer}: the merged zero points are not finite; nothing was written")
    return z


def merge_weight(qw: QuantizedWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 layer: str = "layer") -> QuantizedWeight:
    """The quantized weight with the adapter folded into its zero points (float64 zeros)."""
    return replace(qw, zeros=merge_zero_points(qw.zeros, qw.scales, qw.g_idx, lora_A, lora_B, scaling, layer))


@dataclass
class RoundingLoss:
    """What rounding fractional zero points to GPTQ's integers loses, in units of the scale
    (one unit moves every weight of the group by s)."""
    max_shift: float      # largest |z_int - z'| (0.5 when only rounding; more when clamped)
    mean_shift: float
    clamped_share: float  # share of (group, row) zero points that round outside [1, 2^b - 1]

    def as_dict(self) -> dict:
        return {"max_zero_shift": round(self.max_shift, 6), "mean_zero_shift": round(self.mean_shift, 6),
                "clamped_share": round(self.clamped_share, 8)}


# GPTQ v1 stores z - 1 and its readers add 1 back with a carry across the packed word, so a
# zero point of 0 cannot be stored (quant/grid.py avoids it the same way).
LOWEST_GPTQ_ZERO = 1


def round_zeros(zeros: torch.Tensor, bits: int, lowest: int = LOWEST_GPTQ_ZERO) -> tuple[torch.Tensor, RoundingLoss]:
    """Integer zero points for a GPTQ export: round, then clamp to [lowest, 2^b - 1]."""
    top = max_code(bits)
    z = zeros.double()
    rounded = torch.round(z)
    clamped = (rounded < lowest) | (rounded > top)
    z_int = rounded.clamp(lowest, top)
    shift = (z_int - z).abs()
    loss = RoundingLoss(float(shift.max()) if shift.numel() else 0.0, float(shift.mean()) if shift.numel() else 0.0,
                        float(clamped.double().mean()) if clamped.numel() else 0.0)
    return z_int, loss
