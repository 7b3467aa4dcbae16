"""The Triton kernels against float64 math, on fresh random data: every bit width, integer and
float zero points, contiguous, act-order and per-channel groups, odd shapes, the forward, the
input gradient, the matrix-vector kernel and the dequantization the first two multiply with. Without a GPU they run under TRITON_INTERPRET=1
(set in conftest.py), so shapes stay small."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_helpers import DEVICE, RTOL, random_weight, reference, rel_err  # noqa: E402
from qalora_cli.kernels import triton_quant_matmul as T  # noqa: E402
from qalora_cli.quant.gptq_format import to_gptq_tensors  # noqa: E402
from qalora_cli.quant.pack import pack_rows  # noqa: E402
from qalora_cli.quant.result import QuantizedWeight  # noqa: E402


def kernel_args(qw: QuantizedWeight, zero_kind: str):
    """The tensors as a checkpoint (or a merged qalora layer) stores them."""
    if zero_kind == "int":
        t = to_gptq_tensors(qw)
        qweight, zeros, scales = t["qweight"], t["qzeros"], t["scales"]
    else:
        qweight, zeros, scales = pack_rows(qw.codes.t(), qw.bits), qw.zeros.float(), qw.scales.half()
    contiguous = bool(torch.equal(qw.g_idx.long(), torch.arange(qw.codes.shape[1]) // (
        qw.codes.shape[1] if qw.group_size == -1 else qw.group_size)))
    gs = qw.codes.shape[1] if qw.group_size == -1 else qw.group_size
    dev = [x.to(DEVICE) for x in (qweight, scales, zeros, qw.g_idx)]
    return (*dev, qw.bits, gs, contiguous)


# bits, group size, layout, zeros, (M, K, N). GPTQ packs along K and (qzeros) along N in
# 32-value runs: K is a multiple of 32, and so is N with integer zeros; float zeros allow odd N.
CASES = [
    (4, 32, "contiguous", "int", (33, 96, 96)),
    (4, 32, "act_order", "float", (20, 64, 48)),
    (3, 32, "contiguous", "float", (17, 128, 40)),
    (3, 64, "act_order", "int", (18, 128, 96)),
    (2, 32, "contiguous", "int", (24, 64, 64)),
    (2, -1, "contiguous", "float", (19, 96, 33)),
    (8, 32, "act_order", "int", (40, 64, 32)),
    (8, 64, "contiguous", "float", (16, 128, 25)),
]


@pytest.mark.parametrize("bits, group_size, layout, zero_kind, shape", CASES)
def test_forward_and_input_gradient_match_float64(bits, group_size, layout, zero_kind, shape):
    M, K, N = shape
    qw = random_weight(N, K, bits, group_size, layout, zero_kind, seed=bits * 100 + K + N)
    args = kernel_args(qw, zero_kind)
    w = reference(qw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g)
    dy = torch.randn(M, N, generator=g)
    for dtype in (torch.float32, torch.float16):
        y = T.quant_matmul(x.to(DEVICE, dtype), *args)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel_err(y, x.double() @ w) < RTOL[dtype], (dtype, rel_err(y, x.double() @ w))
        dx = T.quant_matmul_t(dy.to(DEVICE, dtype), *args)
        assert dx.shape == (M, K)
        assert rel_err(dx, dy.double() @ w.t()) < RTOL[dtype], (dtype, rel_err(dx, dy.double() @ w.t()))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits, zero_kind, layout", [(4, "int", "contiguous"), (3, "float", "act_order"),
                                                     (2, "float", "contiguous"), (8, "int", "act_order")])
def test_matvec_path_matches_float64(rows, bits, zero_kind, layout):
    K, N = 128, 64
    qw = random_weight(N, K, bits, 32, layout, zero_kind, seed=rows + bits)
    args = kernel_args(qw, zero_kind)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ reference(qw)
    for dtype in (torch.float32, torch.float16):
        y = T.quant_matmul(x.to(DEVICE, dtype), *args)   # M <= 8 takes the matrix-vector kernel
        assert y.shape == (rows, N) and y.dtype == dtype
        assert rel_err(y, want) < RTOL[dtype], (dtype, rel_err(y, want))
        y2 = T.quant_matvec(x.to(DEVICE, dtype), *args)
        assert torch.equal(y, y2)   # deterministic: fixed split, fixed summation order


# Group sizes whose tiles stay inside one group (32: 32-row tiles; 48: 16-row tiles; the
# per-channel 96: 32-row tiles), one too odd for that (24: rows looked up in g_idx), act-order.
@pytest.mark.parametrize("bits, group_size, layout, zero_kind, K", [
    (4, 32, "contiguous", "int", 128), (3, 48, "contiguous", "float", 96), (4, 24, "contiguous", "int", 96),
    (2, -1, "contiguous", "int", 96), (8, 32, "act_order", "float", 64), (3, 32, "act_order", "int", 96)])
def test_dequantize_is_the_torch_paths_weight_bit_for_bit(bits, group_size, layout, zero_kind, K):
    """W~ rounded once from float32, as TorchQuantLinear's torch path forms it, and within
    that rounding of the float64 definition."""
    from qalora_cli.kernels.torch_quant_linear import TorchQuantLinear

    N = 64
    qw = random_weight(N, K, bits, group_size, layout, zero_kind, seed=bits + K + group_size)
    args = kernel_args(qw, zero_kind)
    layer = TorchQuantLinear(K, N, bits, args[5], False, zero_kind, torch.float16)
    layer.qweight.copy_(args[0])
    layer.scales.copy_(args[1])
    (layer.qzeros if zero_kind == "int" else layer.zeros).copy_(args[2])
    layer.g_idx.copy_(args[3])
    layer.set_backend("torch", None)
    for dtype in (torch.float32, torch.float16):
        w = T.dequantize(*args, dtype)
        assert w.dtype == dtype and w.shape == (K, N)
        assert torch.equal(w.cpu(), layer.to(DEVICE)._weight_in_out(dtype).cpu()), dtype
        assert rel_err(w, reference(qw)) < RTOL[dtype]


@pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter computes bfloat16 dots wrongly (a plain "
                    "bf16 tl.dot is off by 1e10 there), so bfloat16 is checked on a GPU only")
def test_bfloat16_within_its_bound():
    qw = random_weight(64, 64, 4, 32, "contiguous", "float", seed=7)
    args = kernel_args(qw, "float")
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    y = T.quant_matmul(x.to(DEVICE, torch.bfloat16), *args)
    assert rel_err(y, x.double() @ reference(qw)) < RTOL[torch.bfloat16]


def test_non_contiguous_input_rows():
    """A strided view (every other row of a larger tensor) reads the same as its copy."""
    qw = random_weight(64, 64, 4, 32, "contiguous", "int", seed=5)
    args = kernel_args(qw, "int")
    big = torch.randn(40, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    view = big[::2]
    assert torch.equal(T.quant_matmul(view, *args), T.quant_matmul(view.contiguous(), *args))


def test_wrong_input_width_is_refused():
    qw = random_weight(32, 64, 4, 32, "contiguous", "int", seed=1)
    with pytest.raises(ValueError, match=r"expected \[rows, 64\]"):
        T.quant_matmul(torch.randn(4, 32, device=DEVICE), *kernel_args(qw, "int"))
