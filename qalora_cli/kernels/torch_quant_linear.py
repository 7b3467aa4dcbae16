"""The reference QuantLinear: unpack, dequantize, matmul. Any torch device, integer (GPTQ
`qzeros`) or float zero points, and gradients flow to the input (the weights stay frozen).
Faster backends are tested against this one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.gptq_format import decode_qzeros, from_gptq_tensors, to_gptq_tensors
from ..quant.groups import GroupLayout, num_groups
from ..quant.pack import pack_rows, unpack_rows
from ..quant.result import QuantizedWeight
from .base import BackendSupport

SUPPORT = BackendSupport(
    name="torch",
    bits=(2, 3, 4, 8),
    group_sizes="any divisor of in_features, or -1 (per-channel)",
    zero_kinds=("int", "float"),
    devices=("any",),
    trainable_input=True,
)


class _DequantMatmul(torch.autograd.Function):
    """y = x W~ with dx = dy W~^T, where W~ is rebuilt from the packed codes in the backward
    pass instead of being saved: autograd would otherwise keep every layer's dequantized
    weight alive until the backward pass, a full-precision copy of the model."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "TorchQuantLinear", by_group: bool) -> torch.Tensor:
        ctx.layer, ctx.by_group = layer, by_group
        return torch.matmul(x, layer._weight_in_out(x.dtype, by_group))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return torch.matmul(dy, ctx.layer._weight_in_out(dy.dtype, ctx.by_group).t()), None, None


class TorchQuantLinear(nn.Module):
    support = SUPPORT

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, zero_kind: str = "int", dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_kind = bits, group_size, zero_kind
        groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        if zero_kind == "int":
            self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        elif zero_kind == "float":
            self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.float32))
        else:
            raise ValueError(f"zero_kind must be 'int' or 'float', got {zero_kind!r}")
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        # The kernel computing x W~^T: "torch" is this module's own code (the reference);
        # kernels.registry.use_backend puts another backend here.
        self.backend_name, self._backend = "torch", None

    def set_backend(self, name: str, backend) -> None:
        """name and object from kernels.registry (None: the torch reference below)."""
        self.backend_name, self._backend = name, backend
        if backend is not None:
            self.set_weight_cache(False)   # fused kernels never hold a dequantized weight

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       zero_kind: str = "int", dtype: torch.dtype = torch.float16) -> "TorchQuantLinear":
        out_f, in_f = qw.codes.shape
        m = cls(in_f, out_f, qw.bits, qw.group_size, bias is not None, zero_kind, dtype)
        if zero_kind == "int":
            packed = to_gptq_tensors(qw)
            m.qweight.copy_(packed["qweight"])
            m.qzeros.copy_(packed["qzeros"])
        else:
            m.qweight.copy_(pack_rows(qw.codes.t(), qw.bits, "the input width"))
            m.zeros.copy_(qw.zeros)
        m.scales.copy_(qw.scales.to(dtype))
        m.g_idx.copy_(qw.g_idx)
        if bias is not None:
            m.bias.data.copy_(bias.to(dtype))
        return m

    def quantized_weight(self) -> QuantizedWeight:
        if self.zero_kind == "int":
            return from_gptq_tensors({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                                      "g_idx": self.g_idx}, self.bits, self.group_size)
        codes = unpack_rows(self.qweight, self.bits, self.in_features).t().contiguous()
        return QuantizedWeight(codes, self.scales.float(), self.zeros.float(), self.g_idx.clone(),
                               self.bits, self.group_size)

    def _zeros(self) -> torch.Tensor:
        if self.zero_kind == "float":
            return self.zeros.float()
        return decode_qzeros(self.qzeros, self.bits, self.out_features)

    def _group_order(self) -> tuple[bool, torch.Tensor | None]:
        """(groups contiguous?, the input order that makes them contiguous, or None).

        Act-order checkpoints scatter a group's columns. Gathering the rows of the codes by
        group once (the exllama trick) lets the weight be rebuilt with broadcast scales and
        zeros, and the input is gathered to match: all of SmolLM2-135M's layers in 0.10 s
        against 0.18 s when scales and zeros are gathered for every weight (contiguous groups:
        0.07 s). Cached per g_idx tensor, device and version."""
        key = (self.g_idx.data_ptr(), self.g_idx._version, self.g_idx.device)
        if getattr(self, "_order_key", None) != key:
            layout = GroupLayout(self.g_idx, self.scales.shape[0])
            perm = layout.order if not layout.contiguous and layout.equal_sizes else None
            self._order, self._order_key = (layout.contiguous, perm), key
        return self._order

    def _weight_in_out(self, dtype: torch.dtype, by_group: bool = False) -> torch.Tensor:
        """W~ transposed, [in, out], computed in float32: the layout the codes are packed in,
        so no transpose or [out, in] gather is needed on the hot path. With `by_group`, the
        rows come in the order of `_group_order` (contiguous groups)."""
        codes = unpack_rows(self.qweight, self.bits, self.in_features)  # [in, out]
        scales, zeros = self.scales.float(), self._zeros()
        groups = scales.shape[0]
        contiguous, perm = self._group_order()
        if contiguous or by_group:
            if by_group:
                codes = codes.index_select(0, perm)
            c = codes.view(groups, self.in_features // groups, self.out_features).float()
            w = (c - zeros.unsqueeze(1)) * scales.unsqueeze(1)
            return w.view(self.in_features, self.out_features).to(dtype)
        g = self.g_idx.long()  # scattered groups of unequal sizes: gather per weight
        return ((codes.float() - zeros[g]) * scales[g]).to(dtype)

    def _inference_weight(self, dtype: torch.dtype, by_group: bool) -> torch.Tensor:
        """W~ for a forward pass without gradients: rebuilt each time, or kept once built when
        `cache_weight` is on (generation calls every layer once per token, and the rebuild
        then costs more than the matmul; the price is a full-precision copy of the layer)."""
        if not getattr(self, "cache_weight", False):
            return self._weight_in_out(dtype, by_group)
        key = (dtype, by_group, self.qweight.device, tuple(b._version for b in self.buffers(recurse=False)))
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self._weight_in_out(dtype, by_group), key
        return self._cache

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W~ [out, in] in `dtype` (default: the scales')."""
        return self._weight_in_out(dtype or self.scales.dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, compute in the autocast dtype, as nn.Linear would.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if self._backend is not None:
            y = self._backend.forward(self, x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        _, perm = self._group_order()
        by_group = perm is not None
        if by_group:  # x's columns in the weight rows' order; autograd scatters dx back
            x = x.index_select(-1, perm)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _DequantMatmul.apply(x, self, by_group)
        else:
            y = torch.matmul(x, self._inference_weight(x.dtype, by_group))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def set_weight_cache(self, enabled: bool) -> None:
        self.cache_weight = enabled and self._backend is None
        if not enabled:
            self._cache = self._cache_key = None

    def _apply(self, fn, recurse=True):
        """Float zero points stay float32 through `.to(dtype)`, `.half()` and the like: merged
        zeros are fractional, and float16 would round them by up to 2^-8 of a step, shifting
        every weight of the group. They follow the module across devices as usual."""
        self._cache = self._cache_key = None
        zeros = self._buffers.pop("zeros", None) if self.zero_kind == "float" else None
        try:
            super()._apply(fn, recurse)
        finally:
            if zeros is not None:
                device = fn(torch.empty(0, device=zeros.device)).device
                self._buffers["zeros"] = zeros.to(device=device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, zeros={self.zero_kind}, kernel={self.backend_name}")


def cache_inference_weights(model: nn.Module, dtype: torch.dtype, budget_gib: float = 4.0) -> bool:
    """Keep each TorchQuantLinear's rebuilt weight between no-grad forwards when all of them
    together fit in `budget_gib` (evaluation and generation of small models on the CPU: several
    times faster). -> whether the cache is on."""
    layers = [m for m in model.modules() if isinstance(m, TorchQuantLinear)]
    size = sum(m.in_features * m.out_features for m in layers) * torch.empty((), dtype=dtype).element_size()
    enabled = size <= budget_gib * (1 << 30)
    for m in layers:
        m.set_weight_cache(enabled)
    return enabled
