"""QuantizedWeight <-> the tensors of a GPTQ v1 checkpoint (`checkpoint_format: gptq`).

    qweight  int32 [in * b / 32, out]    codes packed along the input dim
    qzeros   int32 [groups, out * b / 32] (z - 1) packed along the output dim (v1 convention)
    scales   fp16  [groups, out]
    g_idx    int32 [in]
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .grid import max_code
from .pack import pack_cols, pack_rows, unpack_cols, unpack_rows
from .result import QuantizedWeight


def to_gptq_tensors(qw: QuantizedWeight, layer: str = "layer") -> dict[str, torch.Tensor]:
    out_f, in_f = qw.codes.shape
    z = torch.round(qw.zeros)
    if not torch.equal(z, qw.zeros):
        raise UserError(f"{layer}: GPTQ qzeros hold integer zero points; this weight has fractional ones")
    return {
        "qweight": pack_rows(qw.codes.t(), qw.bits, f"the input width of {layer}"),
        "qzeros": encode_qzeros(z, qw.bits, layer),
        "scales": qw.scales.to(torch.float16),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def from_gptq_tensors(t: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    in_f = t["g_idx"].shape[0]
    out_f = t["scales"].shape[1]
    codes = unpack_rows(t["qweight"], bits, in_f).t().contiguous()
    zeros = decode_qzeros(t["qzeros"], bits, out_f)
    return QuantizedWeight(codes=codes, scales=t["scales"].float(), zeros=zeros,
                           g_idx=t["g_idx"].to(torch.int32), bits=bits, group_size=group_size)


def encode_qzeros(zeros: torch.Tensor, bits: int, layer: str = "layer") -> torch.Tensor:
    """Integer zero points [groups, out] -> packed v1 `qzeros`. v1 stores z - 1; readers add 1
    back and mask to b bits, so z = 0 wraps to 2^b - 1 and back."""
    stored = (zeros.to(torch.int64) - 1) & max_code(bits)
    return pack_cols(stored, bits, f"the output width of {layer}")


def decode_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Packed v1 `qzeros` -> float zero points [groups, out] (v1 stores z - 1)."""
    stored = unpack_cols(qzeros, bits, out_features)
    return ((stored + 1) & max_code(bits)).float()
