"""What a QuantLinear backend supports, declared as data so selection can explain itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSupport:
    name: str
    bits: tuple[int, ...]
    group_sizes: str          # "any divisor of in_features" or a list, in words for messages
    zero_kinds: tuple[str, ...]  # "int" (packed GPTQ qzeros) and/or "float" (merged QA-LoRA zeros)
    devices: tuple[str, ...]     # "cpu", "cuda", ... ; "any" for every torch device
    trainable_input: bool        # passes gradients to its input (needed under an adapter)

    def why_not(self, bits: int, zero_kind: str, device: str) -> str | None:
        """None when usable, else the reason in one phrase."""
        if bits not in self.bits:
            return f"{self.name}: bits {bits} not in {self.bits}"
        if zero_kind not in self.zero_kinds:
            return f"{self.name}: {zero_kind} zeros not supported"
        if "any" not in self.devices and device not in self.devices:
            return f"{self.name}: device {device} not in {self.devices}"
        return None
