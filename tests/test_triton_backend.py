"""The Triton backend behind the QuantLinear interface, and backend selection: the module's
forward and input gradient against float64, no dequantized weight kept for the backward
pass, a QA-LoRA layer on top training as on the torch reference, and selection that explains
itself. Runs under TRITON_INTERPRET=1 without a GPU (conftest.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from kernel_helpers import DEVICE, RTOL, random_weight, reference, rel_err  # noqa: E402
from qalora_cli.errors import UserError  # noqa: E402
from qalora_cli.kernels.registry import use_backend  # noqa: E402
from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear  # noqa: E402
from qalora_cli.lora.qalora_linear import QALoraLinear  # noqa: E402


def layer(bits=4, group_size=32, layout="contiguous", zero_kind="int", out_f=64, in_f=96, seed=0, bias=True):
    qw = random_weight(out_f, in_f, bits, group_size, layout, zero_kind, seed)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed)) if bias else None
    return TorchQuantLinear.from_quantized(qw, b, zero_kind, torch.float32).to(DEVICE), qw, b


@pytest.mark.parametrize("bits, layout, zero_kind", [(4, "act_order", "int"), (3, "contiguous", "float")])
def test_module_forward_and_backward_match_float64(bits, layout, zero_kind):
    m, qw, b = layer(bits, 32, layout, zero_kind)
    sel = use_backend(nn.Sequential(m), "triton", need_grad=True)
    assert sel.chosen == {"triton": 1} and m.backend_name == "triton"
    w = reference(qw)                                          # [in, out] float64
    x = torch.randn(2, 11, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xd = x.to(DEVICE, torch.float32).requires_grad_(True)
    y = m(xd)
    want = x @ w + b.double()
    assert y.shape == (2, 11, 64) and rel_err(y.detach(), want) < RTOL[torch.float32]
    dy = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y.backward(dy.to(DEVICE, torch.float32))
    assert rel_err(xd.grad, dy @ w.t()) < RTOL[torch.float32]


def test_backward_keeps_no_dequantized_weight():
    """Everything autograd saves during the forward pass is smaller than one W~."""
    m, _, _ = layer(4, 32, "contiguous", "float", out_f=64, in_f=128)
    use_backend(nn.Sequential(m), "triton", need_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 128, device=DEVICE, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    assert x.grad is not None
    assert all(n < 64 * 128 for n in saved), saved
    # The same check catches the naive way: torch.matmul with a dequantized weight saves it.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.matmul(x, m.dequantize_weight(torch.float32).t().requires_grad_(True))
    assert max(saved) >= 64 * 128


def test_qalora_layer_trains_as_on_the_torch_reference():
    """Adapter gradients and the input gradient agree between backends."""
    results = {}
    for kernel in ("torch", "triton"):
        base, _, _ = layer(2, 32, "act_order", "int", seed=3)
        use_backend(nn.Sequential(base), kernel, need_grad=True)
        torch.manual_seed(0)
        q = QALoraLinear(base, rank=4, alpha=8).to(DEVICE)
        with torch.no_grad():
            q.lora_B.normal_()
        x = torch.randn(10, 96, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_(True)
        loss = (q(x) ** 2).mean()
        loss.backward()
        results[kernel] = (loss.item(), q.lora_A.grad.clone(), q.lora_B.grad.clone(), x.grad.clone())
    (l0, a0, b0, x0), (l1, a1, b1, x1) = results["torch"], results["triton"]
    assert l1 == pytest.approx(l0, rel=1e-5)
    for t0, t1 in ((a0, a1), (b0, b1), (x0, x1)):
        assert rel_err(t1, t0.double().cpu()) < 1e-4


def test_auto_picks_torch_on_the_cpu_and_says_why_not_triton():
    if DEVICE != "cpu":
        pytest.skip("checks the CPU choice")
    m, _, _ = layer()
    sel = use_backend(nn.Sequential(m, layer(seed=1)[0]), "auto")
    assert sel.chosen == {"torch": 2} and m.backend_name == "torch"
    assert "triton: not chosen automatically on cpu" in sel.summary()


def test_named_backend_that_cannot_run_a_layer_is_refused():
    m, _, _ = layer(zero_kind="float")
    with pytest.raises(UserError, match=r"kernel 'triton' cannot run layer '0': dtype float64 not supported"):
        use_backend(nn.Sequential(m), "triton", dtype=torch.float64)
    with pytest.raises(UserError, match="unknown kernel 'cuda'"):
        use_backend(nn.Sequential(m), "cuda")


def test_back_to_torch_restores_the_reference_path():
    m, qw, b = layer(8, 64, "contiguous", "int", in_f=128)
    x = torch.randn(5, 128, device=DEVICE)
    use_backend(nn.Sequential(m), "triton")
    y_triton = m(x)
    use_backend(nn.Sequential(m), "torch")
    assert m._backend is None
    y_torch = m(x)
    assert rel_err(y_triton, y_torch.double().cpu()) < RTOL[torch.float32]
