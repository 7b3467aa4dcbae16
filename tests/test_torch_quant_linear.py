"""The reference QuantLinear against float64 math: forward, input gradient, zero kinds."""

import pytest
import torch

from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear
from qalora_cli.quant.gptq import gptq_quantize
from qalora_cli.quant.rtn import rtn_quantize


def reference_weight(qw):
    g = qw.g_idx.long()
    return qw.scales.double()[g].t() * (qw.codes.double() - qw.zeros.double()[g].t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zero_kind", ["int", "float"])
def test_forward_and_input_gradient_match_float64(bits, zero_kind):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 96, generator=gen)
    x_cal = torch.randn(256, 96, generator=gen)
    qw, _ = gptq_quantize(w, 2 / 256 * x_cal.t() @ x_cal, bits, 32, act_order=True)  # non-contiguous g_idx
    if zero_kind == "float":
        qw.zeros = qw.zeros + torch.rand(qw.zeros.shape, generator=gen) - 0.5  # merged adapters make them fractional
    qw.scales = qw.scales.half().float()  # the layer stores fp16 scales
    bias = torch.randn(64, generator=gen)
    layer = TorchQuantLinear.from_quantized(qw, bias, zero_kind, dtype=torch.float32)
    x = torch.randn(3, 5, 96, generator=gen, requires_grad=True)
    y = layer(x)
    W = reference_weight(qw)
    ref = x.detach().double() @ W.t() + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad.double(), dy.double() @ W, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())  # the base stays frozen


def test_round_trip_through_the_layer_keeps_codes_and_zeros():
    qw = rtn_quantize(torch.randn(32, 64), 3, 32)
    layer = TorchQuantLinear.from_quantized(qw, None, "int", torch.float16)
    back = layer.quantized_weight()
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.g_idx, qw.g_idx)


def test_half_precision_input():
    gen = torch.Generator().manual_seed(0)
    qw = rtn_quantize(torch.randn(32, 64, generator=gen), 4, 32)
    layer = TorchQuantLinear.from_quantized(qw, None, "int", torch.float16)
    x = torch.randn(2, 64, generator=gen)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = x.double() @ reference_weight(qw).t()
    # bf16 keeps 8 significant bits: input, weight and output rounding, relative to the output scale
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("kind", ["contiguous", "act-order", "uneven"])
def test_every_group_layout_matches_float64(kind):
    """Contiguous groups, act-order (gathered by group), and unequal scattered groups (the
    per-weight gather): forward and input gradient against the explicit formula."""
    gen = torch.Generator().manual_seed(7)
    qw = rtn_quantize(torch.randn(32, 96, generator=gen), 4, 32)
    if kind == "act-order":
        qw.g_idx = qw.g_idx[torch.randperm(96, generator=gen)]
    if kind == "uneven":
        qw.g_idx = torch.randint(0, 3, (96,), generator=gen, dtype=torch.int32)
        qw.g_idx[:3] = torch.arange(3, dtype=torch.int32)
    layer = TorchQuantLinear.from_quantized(qw, None, "int", dtype=torch.float32)
    assert (layer._group_order()[1] is not None) == (kind == "act-order")
    x = torch.randn(4, 96, generator=gen, requires_grad=True)
    y = layer(x)
    W = reference_weight(qw)
    torch.testing.assert_close(y.double(), x.detach().double() @ W.t(), rtol=1e-5, atol=1e-5)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    torch.testing.assert_close(x.grad.double(), dy.double() @ W, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize_weight(torch.float64), W, rtol=1e-6, atol=1e-6)


def test_the_inference_weight_cache_gives_the_same_output_and_follows_changes():
    from qalora_cli.kernels.torch_quant_linear import cache_inference_weights

    g = torch.Generator().manual_seed(0)
    layer = TorchQuantLinear(64, 32, 4, 32, zero_kind="float", dtype=torch.float32)
    layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, generator=g, dtype=torch.int32))
    layer.scales.copy_(torch.rand(2, 32, generator=g))
    layer.g_idx.copy_(torch.arange(64) // 32)
    x = torch.randn(3, 64, generator=g)
    plain = layer(x)
    model = torch.nn.Sequential(layer)
    assert cache_inference_weights(model, torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), plain) and layer._cache is not None
        layer.zeros.add_(0.5)  # an in-place change must invalidate the cached weight
        # every weight of group j in row o moved by -0.5 s[j, o]
        expected = plain - 0.5 * x.view(3, 2, 32).sum(-1) @ layer.scales
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not cache_inference_weights(model, torch.float32, budget_gib=1e-9) and layer._cache is None
