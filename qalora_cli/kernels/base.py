"""What a QuantLinear backend supports, declared as data, so that selection can say why it
skipped one; and what a layer asks of a backend.

A backend computes y = x W~^T (and, where trainable, dx = dy W~) for a TorchQuantLinear,
which owns the checkpoint's tensors. The torch reference is the module's own code path;
other backends are objects with `support`, `unavailable()` and `forward(layer, x)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LayerSpec:
    """What a backend must handle for one layer."""
    bits: int
    group_size: int            # -1: one group per row
    zero_kind: str             # "int" (packed GPTQ qzeros) or "float" (merged QA-LoRA zeros)
    act_order: bool            # groups scattered over the columns (g_idx not k // g)
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BackendSupport:
    name: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...] | None   # None: any group size that divides in_features, and -1
    zero_kinds: tuple[str, ...]
    devices: tuple[str, ...]              # torch device types; "any" for every one
    trainable_input: bool                 # passes gradients to its input (needed under an adapter)
    act_order: bool = True                # handles scattered groups
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    out_multiple: int = 1                 # out_features must be a multiple of this
    auto_devices: tuple[str, ...] = ("any",)   # where `auto` may pick it (not where it is merely correct)

    def why_not(self, spec: LayerSpec, device: str, dtype: torch.dtype, need_grad: bool) -> str | None:
        """None when usable, else the reason in one phrase."""
        if "any" not in self.devices and device not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device}"
        if spec.bits not in self.bits:
            return f"bits {spec.bits} not in {self.bits}"
        if self.group_sizes is not None and spec.group_size not in self.group_sizes:
            return f"group size {spec.group_size} not in {self.group_sizes}"
        if spec.zero_kind not in self.zero_kinds:
            return f"{spec.zero_kind} zero points not supported (merged models have float ones)"
        if spec.act_order and not self.act_order:
            return "act-order (scattered) groups not supported"
        if dtype not in self.dtypes:
            return f"dtype {str(dtype).removeprefix('torch.')} not supported"
        if spec.out_features % self.out_multiple:
            return f"out_features {spec.out_features} not a multiple of {self.out_multiple}"
        if need_grad and not self.trainable_input:
            return "inference only (no gradient to its input)"
        return None


class Backend(Protocol):
    support: BackendSupport

    def unavailable(self) -> str | None:
        """None when its libraries import here, else why not (e.g. 'triton is not installed')."""

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x W~^T [..., out] (no bias), differentiable in x where trainable."""
