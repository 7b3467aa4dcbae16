"""GPTQ bit packing: codes as a little-endian bit stream in int32 words along one dimension.

Every 32 consecutive values of `bits` bits fill exactly `bits` words. For 2, 4 and 8 bits this
is the familiar "value j of a word at bit j*bits"; for 3 bits it is the 32-values-in-3-words
layout of GPTQ/AutoGPTQ/GPTQModel (a value may straddle two words).
"""

from __future__ import annotations

import torch

from ..errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


def check_packable(bits: int, n: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise UserError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if n % 32:
        raise UserError(f"{what} is {n}, but GPTQ packing needs a multiple of 32")


def pack_rows(codes: torch.Tensor, bits: int, what: str = "the packed dimension") -> torch.Tensor:
    """[n, m] integer codes -> int32 [n * bits / 32, m], packing along dim 0."""
    n, m = codes.shape
    check_packable(bits, n, what)
    c = codes.to(torch.int64).reshape(n // 32, 32, m)
    words = torch.zeros(n // 32, bits, m, dtype=torch.int64, device=codes.device)
    for k in range(32):
        offset = k * bits
        w, shift = divmod(offset, 32)
        words[:, w] |= (c[:, k] << shift) & _MASK32
        if shift + bits > 32:  # the value straddles into the next word
            words[:, w + 1] |= c[:, k] >> (32 - shift)
    words = words.reshape(n // 32 * bits, m)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [n * bits / 32, m] -> int32 codes [n, m]."""
    check_packable(bits, n, "the unpacked dimension")
    m = packed.shape[1]
    if packed.shape[0] * 32 != n * bits:
        raise UserError(f"a packed tensor of {packed.shape[0]} rows cannot hold {n} values of {bits} bits")
    if 32 % bits == 0:
        # Whole values per word: one vectorized shift (an arithmetic shift of a negative word
        # brings in ones from the left, which the mask removes).
        per_word = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, per_word, 1)
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(n, m)
    words = (packed.to(torch.int64) & _MASK32).reshape(n // 32, bits, m)
    mask = (1 << bits) - 1
    out = torch.empty(n // 32, 32, m, dtype=torch.int64, device=packed.device)
    for k in range(32):
        offset = k * bits
        w, shift = divmod(offset, 32)
        v = words[:, w] >> shift
        if shift + bits > 32:
            v = v | (words[:, w + 1] << (32 - shift))
        out[:, k] = v & mask
    return out.reshape(n, m).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int, what: str = "the packed dimension") -> torch.Tensor:
    """[m, n] -> int32 [m, n * bits / 32], packing along dim 1 (GPTQ `qzeros`)."""
    return pack_rows(codes.t(), bits, what).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, n).t().contiguous()
