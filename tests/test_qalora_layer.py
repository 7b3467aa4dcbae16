"""The QA-LoRA layer against float64 math: pooling by g_idx, forward, gradients, and the
per-group update that the merge folds into the zero points."""

import pytest
import torch

from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear
from qalora_cli.lora.pooling import GroupPool
from qalora_cli.lora.qalora_linear import QALoraLinear
from qalora_cli.quant.gptq import gptq_quantize


def pooling_matrix(g_idx: torch.Tensor, groups: int) -> torch.Tensor:
    """P [groups, in] float64 with P[j, k] = 1/|group j| where g_idx[k] == j: the explicit formula."""
    P = torch.zeros(groups, g_idx.numel(), dtype=torch.float64)
    for k, j in enumerate(g_idx.tolist()):
        P[j, k] = 1.0
    return P / P.sum(1, keepdim=True)


@pytest.mark.parametrize("kind", ["contiguous", "act-order", "uneven"])
def test_pooling_by_g_idx_equals_the_explicit_mean(kind):
    gen = torch.Generator().manual_seed(1)
    width, g = 96, 32
    g_idx = torch.arange(width) // g
    if kind == "act-order":
        g_idx = g_idx[torch.randperm(width, generator=gen)]
    if kind == "uneven":
        g_idx = torch.randint(0, 5, (width,), generator=gen)
        g_idx[:5] = torch.arange(5)
    groups = int(g_idx.max()) + 1
    x = torch.randn(2, 7, width, generator=gen, dtype=torch.float64)
    pooled = GroupPool(g_idx.int(), groups)(x)
    torch.testing.assert_close(pooled, x @ pooling_matrix(g_idx, groups).t())
    for j in range(groups):  # the definition, one group at a time
        torch.testing.assert_close(pooled[..., j], x[..., g_idx == j].mean(-1))


def _quantized_layer(act_order: bool, bits: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=gen)
    x_cal = torch.randn(512, 128, generator=gen)
    qw, _ = gptq_quantize(w, 2 / 512 * x_cal.t() @ x_cal, bits, 32, act_order=act_order)
    qw.scales = qw.scales.half().float()
    return qw, TorchQuantLinear.from_quantized(qw, None, "int", dtype=torch.float32)


@pytest.mark.parametrize("act_order", [False, True])
def test_forward_and_gradients_match_a_float64_dense_reference(act_order):
    qw, base = _quantized_layer(act_order)
    if act_order:
        assert not torch.equal(qw.g_idx, torch.arange(128, dtype=qw.g_idx.dtype) // 32)
    layer = QALoraLinear(base, rank=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking B (it starts at zero)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 128, generator=gen, requires_grad=True)
    y = layer(x)

    W = qw.dequantize().double()                       # [out, in]
    P = pooling_matrix(qw.g_idx.long(), 4)             # [groups, in]
    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.detach().double().requires_grad_()
    B64 = layer.lora_B.detach().double().requires_grad_()
    ref = x64 @ W.t() + (16 / 8) * x64 @ P.t() @ A64.t() @ B64.t()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)

    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad.double(), A64.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad.double(), B64.grad, rtol=1e-5, atol=1e-4)
    assert base.qweight.grad is None and not base.scales.requires_grad


def test_untrained_layer_is_the_base():
    _, base = _quantized_layer(True)
    layer = QALoraLinear(base, rank=4, alpha=16)
    x = torch.randn(6, 128)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_adapter_equals_a_per_group_constant_weight_update(act_order):
    """The premise of the exact merge: the adapter acts as a dense update that is constant on
    each (row, group), delta[o, g_idx[k]], which a zero-point shift represents exactly."""
    qw, base = _quantized_layer(act_order)
    layer = QALoraLinear(base, rank=8, alpha=16).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    delta = layer.delta_groups()                       # [out, groups]
    dense = delta[:, qw.g_idx.long()]                  # [out, in]
    x = torch.randn(10, 128, dtype=torch.float64)
    torch.testing.assert_close(layer.adapter_output(x), x @ dense.t(), rtol=1e-10, atol=1e-10)


def test_dropout_applies_in_training_only():
    _, base = _quantized_layer(False)
    layer = QALoraLinear(base, rank=4, alpha=16, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 128)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_quant_linear_backward_does_not_keep_the_dequantized_weight():
    """dx is rebuilt from the packed codes; autograd saves no [in, out] float tensor."""
    _, base = _quantized_layer(False)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        base(x).sum().backward()
    assert (128, 64) not in saved and (64, 128) not in saved
