"""RTN, GPTQ and the GPTQ tensor layout against float64 references."""

import pytest
import torch

from qalora_cli.errors import UserError
from qalora_cli.quant.gptq import HessianAccumulator, gptq_quantize, output_error
from qalora_cli.quant.gptq_format import from_gptq_tensors, to_gptq_tensors
from qalora_cli.quant.result import QuantizedWeight
from qalora_cli.quant.rtn import rtn_quantize


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Inputs with a few dominant directions and outlier features, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 8
    return x


def test_hessian_accumulator_equals_float64_formula():
    x = correlated_inputs(300, 64, 0)
    acc = HessianAccumulator(64)
    for chunk in x.split(70):
        acc.add(chunk)
    ref = 2.0 / 300 * x.double().t() @ x.double()
    torch.testing.assert_close(acc.H.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_rtn_matches_explicit_float64_formula(bits, group_size):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    qw = rtn_quantize(w, bits, group_size)
    maxq = 2**bits - 1
    gs = 64 if group_size == -1 else group_size
    ref = torch.empty_like(w)
    for j in range(64 // gs):
        blk = w[:, j * gs:(j + 1) * gs]
        lo = blk.min(1, keepdim=True).values.clamp(max=0)
        hi = blk.max(1, keepdim=True).values.clamp(min=0)
        s = (hi - lo) / maxq
        z = torch.round(-lo / s)
        low = z < 1  # z = 0 is not storable in GPTQ v1: such groups get z = 1, s = max / (maxq - 1)
        s = torch.where(low, hi / (maxq - 1), s)
        z = torch.where(low, torch.ones_like(z), z)
        ref[:, j * gs:(j + 1) * gs] = s * (torch.clamp(torch.round(blk / s) + z, 0, maxq) - z)
    assert qw.codes.min() >= 0 and qw.codes.max() <= maxq
    torch.testing.assert_close(qw.dequantize().double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_gptq_output_error_below_rtn(bits, group_size):
    x = correlated_inputs(512, 128, bits)
    g = torch.Generator().manual_seed(100 + bits)
    w = torch.randn(64, 128, generator=g)
    H = 2.0 / x.shape[0] * x.t() @ x
    rtn = rtn_quantize(w, bits, group_size)
    gptq, _ = gptq_quantize(w, H, bits, group_size)
    # the error on the actual inputs, computed independently in float64
    def err(wq):
        return ((x.double() @ (w.double() - wq.double()).t()) ** 2).sum() / ((x.double() @ w.double().t()) ** 2).sum()
    e_rtn, e_gptq = err(rtn.dequantize()), err(gptq.dequantize())
    assert e_gptq < e_rtn
    assert abs(output_error(w, gptq.dequantize(), H) - float(e_gptq)) < 1e-3 * float(e_rtn) + 1e-7


@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_act_order_records_groups(static_groups):
    x = correlated_inputs(400, 128, 7)
    x[:, 100] *= 20  # make the order differ from the natural one
    H = 2.0 / 400 * x.t() @ x
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(7))
    qw, _ = gptq_quantize(w, H, 4, 32, act_order=True, static_groups=static_groups)
    counts = torch.bincount(qw.g_idx.long(), minlength=4)
    assert counts.tolist() == [32, 32, 32, 32]  # every group has exactly g columns
    contiguous = torch.equal(qw.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    assert contiguous == static_groups
    # dequantization through g_idx reproduces what GPTQ chose, within the quantization grid
    rtn = rtn_quantize(w, 4, 32)
    e = lambda wq: ((x @ (w - wq).t()) ** 2).sum()
    assert e(qw.dequantize()) < e(rtn.dequantize())


def test_gptq_retries_damping_on_singular_hessian():
    H = torch.zeros(64, 64)
    H[:8, :8] = 1.0  # rank one, and dead columns
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    qw, stats = gptq_quantize(w, H, 4, 32, damp_percent=1e-12)
    assert stats.damp_percent > 1e-12
    assert torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensor_layout_round_trip_with_extreme_zeros(bits):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(bits))
    w[:5, :32] = w[:5, :32].abs()   # all-positive group: the lowest storable zero point, 1
    w[5:9, :32] = -w[5:9, :32].abs()  # all-negative group: zero point 2^b - 1
    qw = rtn_quantize(w, bits, 32)
    assert qw.zeros.min() == 1 and qw.zeros.max() == 2**bits - 1
    # the all-positive rows are still covered by their grid: no clipping beyond half a step
    s = qw.scales[0, :5].unsqueeze(1)
    assert ((qw.dequantize()[:5, :32] - w[:5, :32]).abs() <= s / 2 + 1e-6).all()
    t = to_gptq_tensors(qw)
    assert t["qweight"].shape == (64 * bits // 32, 64) and t["qzeros"].shape == (2, 64 * bits // 32)
    back = from_gptq_tensors(t, bits, 32)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=1e-3, atol=1e-3)  # fp16 scales


def test_fractional_zeros_refuse_integer_layout():
    qw = rtn_quantize(torch.randn(32, 32), 4, 32)
    qw.zeros = qw.zeros + 0.25
    with pytest.raises(UserError, match="fractional"):
        to_gptq_tensors(qw, "L")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clip_search_never_worse_than_full_range(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 64, generator=g)
    w[:, 3] *= 6  # outliers that a shrunk range may clip
    def err(qw):
        return ((qw.dequantize() - w).abs() ** 2.4).reshape(64, 2, 32).sum(-1)
    plain, clipped = rtn_quantize(w, bits, 32), rtn_quantize(w, bits, 32, clip_search=True)
    assert (err(clipped) <= err(plain) + 1e-6).all()  # per group: 1.0 is among the candidates
    assert err(clipped).sum() < err(plain).sum()
    assert clipped.zeros.min() >= 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_are_held_at_a_byte_a_weight_and_dequantize_as_the_float64_formula(bits):
    # The quantize run holds every layer's codes until the end (the memory plan counts a byte a
    # weight); the compact dtype must not change a single code, up to 2^8 - 1 at 8 bits.
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (16, 64), generator=g, dtype=torch.int32)
    codes[0, 0], codes[0, 1] = 0, 2 ** bits - 1
    scales, zeros = torch.rand(2, 16, generator=g) + 0.1, torch.randint(0, 2 ** bits, (2, 16), generator=g).float()
    g_idx = torch.arange(64, dtype=torch.int32) // 32
    qw = QuantizedWeight(codes, scales, zeros, g_idx, bits, 32)
    assert qw.codes.dtype == torch.uint8 and qw.codes.element_size() * qw.codes.numel() == 16 * 64
    assert torch.equal(qw.codes.to(torch.int32), codes)
    ref = scales.double()[g_idx.long()].T * (codes.double() - zeros.double()[g_idx.long()].T)
    torch.testing.assert_close(qw.dequantize().double(), ref, rtol=1e-6, atol=1e-6)
    rounded = rtn_quantize(torch.randn(16, 64, generator=g), bits, 32)
    assert rounded.codes.dtype == torch.uint8 and int(rounded.codes.max()) <= 2 ** bits - 1
    with pytest.raises(TypeError, match="integers"):
        QuantizedWeight(codes.float(), scales, zeros, g_idx, bits, 32)
