"""What `train.mixed_precision: auto` means on this machine: one answer for the fine-tune and its plan.

On the CPU, bf16 autocast pays only where the CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX).
Elsewhere torch converts every operand and runs the product in float32 kernels: measured on an
AVX512 Xeon without BF16 (2 cores, 2026-11-30), a 2048x576 by 576x1536 matmul with its backward took
4.0x as long under bf16 autocast as in float32, and a QA-LoRA training step on SmolLM2 2.71x as long
(docs/BENCHMARKS.md). So auto picks bf16 there and float32 everywhere else on the CPU.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """x86 AVX512-BF16 or AMX tiles (torch's own CPU probes; private, hence the guard). Other CPUs
    (ARM included) are not probed by torch and count as without: float32 is never the slow choice."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_mixed_precision(choice: str, device_type: str) -> str:
    """`auto` resolved for a device type: bf16 on CUDA where supported (else fp16), bf16 on a CPU
    with native bf16, no elsewhere; any other choice is returned as it is."""
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "no"


def runs_half(choice: str, device_type: str) -> bool:
    """For the memory plans: does the run compute in a 16-bit type? auto on CUDA always does (bf16 or
    fp16, 2 bytes either way), without probing a GPU the plan may be made for elsewhere."""
    if choice == "auto" and device_type == "cuda":
        return True
    return resolve_mixed_precision(choice, device_type) in ("bf16", "fp16")
