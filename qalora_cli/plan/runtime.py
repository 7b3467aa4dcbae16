"""What a stage's process holds besides the tensors the plans count.

The runtime: the Python interpreter, torch, transformers, tokenizers, accelerate and the rest of
what the stage imports, their thread pools and allocator arenas. It does not grow with the
model, so it is measured once, not derived: each figure is the peak RSS of the stage run on the
2-layer, 64-wide random Llama of the tests (tests/conftest.py, under 1 MB of weights), i.e. the
stage with its model's share taken away. Measured on 2026-11-30: Linux x86-64, Python 3.11,
torch 2.13.0 (CPU build), transformers 5.24.0, OMP_NUM_THREADS=1; tests/test_memory_plan_slow.py
measures them again. Another torch build or many more threads shift them by tens of MiB.

The allocator margin: memory the process holds for tensors already freed. glibc's malloc keeps
freed blocks of under 32 MiB in its heap, and short-lived work (GPTQ's copies, a micro-batch's
activations, a probe's logits) freed between long-lived tensors cannot be handed back, so the
peak RSS runs above the sum of live tensors. On SmolLM2-135M the three stages' peaks exceeded
their counted tensors by 25-50% (docs/RELIABILITY.md, section 6); one margin of 30% of the
counted tensors is added to every phase. Larger models allocate most of their tensors above the
threshold (mapped and unmapped directly), so for them the margin errs on the safe side. torch's
CUDA caching allocator keeps freed blocks too; the same margin is applied on a GPU (not measured)."""

from __future__ import annotations

from .budget import Phase

MIB = 1 << 20

# Peak RSS (bytes) of each stage on the tiny model. The PEFT baselines import more: peft, whose
# get_peft_model imports GPTQModel to look for its layers (about 170 MiB here), and bitsandbytes:
# finetune.method lora and qlora, and merge --format float (of a qlora adapter, whose verification
# loads the NF4 model too). Measured on 2026-11-30 as the others.
RUNTIME_CPU_BYTES = {
    "quantize": 537 * MIB,
    "finetune": 607 * MIB,
    "merge": 522 * MIB,
    "finetune lora": 816 * MIB,
    "finetune qlora": 657 * MIB,
    "merge float": 754 * MIB,
}

# A CUDA process's context (kernels, cuBLAS workspaces), which torch's allocator statistics do not
# count. Not measured (the machine the figures come from has no GPU): 500 MiB is the usual size of
# torch 2.x's context on recent NVIDIA GPUs.
CUDA_CONTEXT_BYTES = 500 * MIB

ALLOCATOR_MARGIN = 0.30

RUNTIME_LABEL = "Python, torch, transformers (runtime, measured)"


def add_runtime(phase: Phase, stage: str) -> Phase:
    return phase.add(RUNTIME_LABEL, "cpu", RUNTIME_CPU_BYTES[stage], fixed=True)


def add_gpu_context(phase: Phase, device: str) -> Phase:
    return phase.add("CUDA context", device, CUDA_CONTEXT_BYTES if device == "cuda" else 0, fixed=True)


def add_allocator_margin(phases: list[Phase]) -> list[Phase]:
    """Each phase's margin on each device, over the tensors it counts (not the constants)."""
    for phase in phases:
        for device in phase.devices():
            tensors = sum(c.bytes for c in phase.components if c.device == device and not c.fixed)
            phase.add(f"allocator margin ({ALLOCATOR_MARGIN:.0%} of the tensors: freed, not returned)", device,
                      ALLOCATOR_MARGIN * tensors)
    return phases
