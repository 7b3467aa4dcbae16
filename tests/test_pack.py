"""Bit packing against an independent reference: Python big integers as the bit stream."""

import pytest
import torch

from qalora_cli.errors import UserError
from qalora_cli.quant.pack import pack_cols, pack_rows, unpack_cols, unpack_rows


def reference_pack_column(values: list[int], bits: int) -> list[int]:
    """32 values -> `bits` signed int32 words, value k at bit k*bits of a little-endian stream."""
    stream = 0
    for k, v in enumerate(values):
        stream |= v << (k * bits)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(bits)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_bitstream_reference(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 5), generator=g, dtype=torch.int32)
    codes[0, 0] = 2**bits - 1  # the top bit set in every position class
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    for col in range(5):
        for chunk in range(3):
            vals = codes[chunk * 32:(chunk + 1) * 32, col].tolist()
            assert packed[chunk * bits:(chunk + 1) * bits, col].tolist() == reference_pack_column(vals, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_rows_and_cols(bits):
    g = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (64, 32), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits, 64), codes)
    assert torch.equal(unpack_cols(pack_cols(codes, bits), bits, 32), codes)


def test_three_bit_layout_matches_autogptq_loop():
    """The 32-values-in-3-words layout as AutoGPTQ's packing loop writes it."""
    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 8, (32,), generator=g).tolist()
    w = [0, 0, 0]
    for j in range(10):
        w[0] |= v[j] << (3 * j)
    w[0] |= (v[10] << 30) & 0xFFFFFFFF
    w[1] |= (v[10] >> 2) & 1
    for j in range(10):
        w[1] |= v[11 + j] << (3 * j + 1)
    w[1] |= (v[21] << 31) & 0xFFFFFFFF
    w[2] |= (v[21] >> 1) & 3
    for j in range(10):
        w[2] |= v[22 + j] << (3 * j + 2)
    expected = [x - (1 << 32) if x >= 1 << 31 else x for x in w]
    packed = pack_rows(torch.tensor(v, dtype=torch.int32).unsqueeze(1), 3)
    assert packed[:, 0].tolist() == expected


def test_bad_bits_and_widths_are_user_errors():
    with pytest.raises(UserError, match="bits must be one of"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int32), 5)
    with pytest.raises(UserError, match="multiple of 32"):
        pack_rows(torch.zeros(48, 1, dtype=torch.int32), 4, "the input width of L")
