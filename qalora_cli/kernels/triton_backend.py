"""The Triton backend: the kernels of triton_quant_matmul behind the QuantLinear interface, with
autograd. Decoding (up to 8 rows) never writes W~; larger products dequantize W~ for the one
call and multiply with cuBLAS, and the backward pass dequantizes again, so no W~ is kept
between the passes."""

from __future__ import annotations

import importlib.util
import os

import torch

from .base import BackendSupport

SUPPORT = BackendSupport(
    name="triton",
    bits=(2, 3, 4, 8),
    group_sizes=None,
    zero_kinds=("int", "float"),
    # Under TRITON_INTERPRET=1 the kernels run on the CPU through numpy: slow, for tests.
    devices=("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
    trainable_input=True,
    act_order=True,
    out_multiple=1,
    auto_devices=("cuda",),   # interpreted on the CPU it is correct but thousands of times slower
)


def _kernels():
    from . import triton_quant_matmul

    return triton_quant_matmul


def kernel_args(layer) -> tuple:
    """The layer's tensors as the kernels read them, untouched: (qweight, scales, zeros,
    g_idx, bits, group size, contiguous)."""
    contiguous, _ = layer._group_order()
    zeros = layer.zeros if layer.zero_kind == "float" else layer.qzeros
    group_size = layer.in_features // layer.scales.shape[0]
    return layer.qweight, layer.scales, zeros, layer.g_idx, layer.bits, group_size, contiguous


class _TritonQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer) -> torch.Tensor:
        ctx.layer = layer
        return _kernels().quant_matmul(x, *kernel_args(layer))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return _kernels().quant_matmul_t(dy.contiguous(), *kernel_args(ctx.layer)), None


class TritonBackend:
    support = SUPPORT

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        return None

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _TritonQuantMatmul.apply(x.reshape(-1, layer.in_features), layer)
        return y.view(*lead, layer.out_features)
