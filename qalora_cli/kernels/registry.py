"""Choosing a QuantLinear backend per layer: by name, or `auto` (the first usable one in
AUTO_ORDER), with the reason each skipped backend gave.

    torch      the reference: any device, every layout, float zeros, autograd
    triton     fused dequantize-and-matmul kernels (CUDA; the CPU under TRITON_INTERPRET=1)
    gptqmodel  the peer's kernels (exllama v2, Marlin, ...), integer zeros, where installed
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .base import Backend, LayerSpec

# `auto` tries these in order; the peer kernels are used only when named.
AUTO_ORDER = ("triton", "torch")
NAMES = ("auto", "torch", "triton", "gptqmodel")


def backends() -> dict[str, Backend | None]:
    """name -> backend object (None: the module's own torch path)."""
    from .gptqmodel_backend import GPTQModelBackend
    from .triton_backend import TritonBackend

    return {"torch": None, "triton": TritonBackend(), "gptqmodel": GPTQModelBackend()}


def layer_spec(layer) -> LayerSpec:
    contiguous, _ = layer._group_order()
    return LayerSpec(layer.bits, layer.group_size, layer.zero_kind, not contiguous, layer.in_features,
                     layer.out_features)


def why_not(name: str, backend: Backend | None, spec: LayerSpec, device: str, dtype: torch.dtype,
            need_grad: bool) -> str | None:
    if backend is None:
        return None
    return backend.unavailable() or backend.support.why_not(spec, device, dtype, need_grad)


@dataclass
class Selection:
    """What `use_backend` chose: layers per backend, and each skip reason with its count."""
    chosen: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)   # "name: reason" -> layers

    def summary(self) -> str:
        used = ", ".join(f"{n} ({k} layers)" for n, k in self.chosen.items()) or "none"
        text = f"kernels: {used}"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{r} ({k} layers)" for r, k in self.skipped.items())
        return text


def use_backend(model: nn.Module, requested: str = "auto", dtype: torch.dtype | None = None,
                need_grad: bool = False) -> Selection:
    """Set every TorchQuantLinear's backend. A named backend that cannot run a layer is an
    error naming the layer and the reason; `auto` falls back along AUTO_ORDER."""
    from .torch_quant_linear import TorchQuantLinear

    if requested not in NAMES:
        raise UserError(f"unknown kernel '{requested}': use one of {', '.join(NAMES)}")
    table = backends()
    order = AUTO_ORDER if requested == "auto" else (requested,)
    sel = Selection()
    for name, layer in model.named_modules():
        if not isinstance(layer, TorchQuantLinear):
            continue
        spec = layer_spec(layer)
        device = layer.qweight.device.type
        want = dtype or layer.scales.dtype
        for candidate in order:
            reason = why_not(candidate, table[candidate], spec, device, want, need_grad)
            backend = table[candidate]
            if reason is None and requested == "auto" and backend is not None \
                    and "any" not in backend.support.auto_devices and device not in backend.support.auto_devices:
                reason = f"not chosen automatically on {device} (name it to use it)"
            if reason is None:
                layer.set_backend(candidate, table[candidate])
                sel.chosen[candidate] += 1
                break
            if requested != "auto":
                raise UserError(f"kernel '{requested}' cannot run layer '{name}': {reason}")
            sel.skipped[f"{candidate}: {reason}"] += 1
    return sel
