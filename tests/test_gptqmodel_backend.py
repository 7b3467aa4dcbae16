"""The GPTQModel backend (the peer library's kernels on our GPTQ tensors) against float64 math
computed straight from random codes, scales and zeros: every bit width, contiguous and
act-order groups, per-channel, selection through the registry, refusals, the input gradient
and the rebuild when the layer's tensors change. On the CPU GPTQModel runs its TorchLinear."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")

from qalora_cli.errors import UserError  # noqa: E402
from qalora_cli.kernels.gptqmodel_backend import SUPPORT, GPTQModelBackend  # noqa: E402
from qalora_cli.kernels.registry import use_backend  # noqa: E402
from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear  # noqa: E402
from qalora_cli.quant.result import QuantizedWeight  # noqa: E402

IN, OUT = 128, 64
# max |diff| / max |reference|. TorchLinear dequantizes in the scales' dtype (one rounding of
# each weight) and multiplies in the input dtype: float16 keeps 11 significant bits, bfloat16 8.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_case(bits: int, group_size: int, act_order: bool, seed: int, zero_kind: str = "int"):
    g = torch.Generator().manual_seed(seed)
    gs = IN if group_size == -1 else group_size
    groups = IN // gs
    g_idx = torch.arange(IN) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(IN, generator=g)]
    top = 2 ** bits - 1
    codes = torch.randint(0, top + 1, (OUT, IN), generator=g, dtype=torch.int32)
    scales = torch.rand(groups, OUT, generator=g) * 0.02 + 0.001
    if zero_kind == "int":
        zeros = torch.randint(0, top + 1, (groups, OUT), generator=g).float()
        zeros[0, :2] = torch.tensor([0.0, top])   # the ends: v1 stores z = 0 as 2^b - 1
    else:
        zeros = torch.rand(groups, OUT, generator=g) * top
    return QuantizedWeight(codes, scales, zeros, g_idx.to(torch.int32), bits, group_size)


def reference_weight(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W~ [out, in] in float64 from the codes, with the scales as the layer stores them."""
    g = qw.g_idx.long()
    s = qw.scales.to(dtype).double()[g].t()
    z = qw.zeros.double()[g].t()
    return s * (qw.codes.double() - z)


def make_layer(qw, dtype, bias=None):
    layer = TorchQuantLinear.from_quantized(qw, bias, "int", dtype)
    layer.set_backend("gptqmodel", GPTQModelBackend())
    return layer


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True], ids=["contiguous", "act_order"])
def test_forward_matches_float64(bits, act_order):
    dtype = torch.bfloat16 if bits == 3 else torch.float16
    qw = random_case(bits, 32, act_order, seed=bits + 10 * act_order)
    bias = torch.randn(OUT) * 0.1
    layer = make_layer(qw, dtype, bias)
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    ref = x.double() @ reference_weight(qw, dtype).t() + bias.to(dtype).double()
    assert y.shape == (2, 3, OUT) and y.dtype == dtype
    assert rel_err(y, ref) < RTOL[dtype]
    # The kernel shares the layer's packed words: no copy, and no float weight kept.
    module = next(iter(layer._gptqmodel_linear[1].values()))
    assert type(module).__name__ == "TorchLinear"
    assert module.qweight.data_ptr() == layer.qweight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_channel_and_float32_input(dtype):
    qw = random_case(4, -1, False, seed=3)
    layer = make_layer(qw, dtype)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2))
    ref = x.to(dtype).double() @ reference_weight(qw, dtype).t()
    y = layer(x)   # float32 in: computed in the kernel's dtype, returned as float32
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < RTOL[dtype]


def test_registry_selects_gptqmodel_and_refuses_what_it_cannot_run():
    qa, qb = random_case(4, 32, False, seed=5), random_case(3, 64, True, seed=6)
    model = nn.ModuleDict({"a": make_layer(qa, torch.float16), "act": nn.Identity(),
                           "b": make_layer(qb, torch.float16)})
    for m in model.values():
        if isinstance(m, TorchQuantLinear):
            m.set_backend("torch", None)
    sel = use_backend(model, "gptqmodel")
    assert dict(sel.chosen) == {"gptqmodel": 2}
    assert model["a"].backend_name == model["b"].backend_name == "gptqmodel"
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3)).half()
    for name, qw in (("a", qa), ("b", qb)):
        ref = x.double() @ reference_weight(qw, torch.float16).t()
        assert rel_err(model[name](x), ref) < RTOL[torch.float16]

    assert dict(use_backend(model, "gptqmodel", need_grad=True).chosen) == {"gptqmodel": 2}

    merged = TorchQuantLinear.from_quantized(random_case(4, 32, False, 7, "float"), None, "float",
                                             torch.float16)
    with pytest.raises(UserError, match=r"'proj'.*float zero points not supported"):
        use_backend(nn.Sequential(OrderedDict(proj=merged)), "gptqmodel")
    with pytest.raises(UserError, match="dtype float32 not supported"):
        use_backend(model, "gptqmodel", dtype=torch.float32)


def test_input_gradient_matches_float64():
    qw = random_case(4, 32, True, seed=8)
    layer = make_layer(qw, torch.float16)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, IN, generator=gen).half().requires_grad_()
    dy = torch.randn(6, OUT, generator=gen).half()
    layer(x).backward(dy)
    ref = dy.double() @ reference_weight(qw, torch.float16)
    assert x.grad is not None and rel_err(x.grad, ref) < RTOL[torch.float16]


def test_rebuilt_when_the_layer_tensors_change():
    qw = random_case(8, 32, False, seed=9)
    layer = make_layer(qw, torch.float16)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(5)).half()
    y1 = layer(x)
    first = layer._gptqmodel_linear
    assert layer(x) is not None and layer._gptqmodel_linear is first   # cached
    with torch.no_grad():
        layer.scales.mul_(2)
    y2 = layer(x)
    assert layer._gptqmodel_linear is not first
    assert rel_err(y2, 2 * y1.double()) < 2 * RTOL[torch.float16]
    assert not any(n.startswith("_gptqmodel") for n, _ in layer.named_modules())
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx"}


def test_declared_support_matches_gptqmodel():
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    assert SUPPORT.group_sizes == tuple(TorchLinear.SUPPORTS_GROUP_SIZE)
    assert set(SUPPORT.bits) <= set(TorchLinear.SUPPORTS_BITS)
    assert set(SUPPORT.dtypes) == set(TorchLinear.SUPPORTS_DTYPES)
    assert TorchLinear.SUPPORTS_TRAINING and True in TorchLinear.SUPPORTS_DESC_ACT
    assert GPTQModelBackend().unavailable() is None


def test_unavailable_names_the_install_command(monkeypatch):
    import sys

    from qalora_cli.kernels.gptqmodel_backend import _import_error

    monkeypatch.setitem(sys.modules, "gptqmodel", None)   # as if not installed
    assert _import_error.__wrapped__() == "gptqmodel is not installed (pip install gptqmodel)"
