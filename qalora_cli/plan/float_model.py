"""A float model as transformers' from_pretrained loads it on the CPU (models/loading.load_model,
lora/peft_models.load_float_base, the float merge's probes): the model, and what the reading
holds besides it."""

from __future__ import annotations

from .budget import Phase
from .shapes import ModelShape

# transformers' save_pretrained writes shards of up to 50 GB by default (lora/peft_models saves
# the 16-bit model so, for bitsandbytes to load a GGUF source; the float merge saves its output so)
SAVE_SHARD_BYTES = 50 * 10 ** 9


def add_float_model(phase: Phase, shape: ModelShape, dtype_bytes: int, label: str = "float model") -> Phase:
    """The model in `dtype_bytes` on the CPU (where every float load starts), and what its reading holds."""
    phase.add(f"{label}, {shape.total_params / 1e9:.3g}B parameters", "cpu", shape.total_params * dtype_bytes)
    return _add_reading(phase, shape, dtype_bytes)


def _add_reading(phase: Phase, shape: ModelShape, dtype_bytes: int) -> Phase:
    """A GGUF file is mapped and dequantized one tensor at a time, to float32. A safetensors shard
    is mapped, and the pages read stay resident until it is closed: when its tensors are converted
    to another dtype they are copies, beside the pages; in the stored dtype the model's tensors
    are the mapped pages themselves (counted once, as the model)."""
    if shape.gguf:
        phase.add("GGUF file, mapped while read", "cpu", shape.weight_file_bytes)
        phase.add("largest tensor dequantized to float32", "cpu", shape.vocab * shape.hidden * 4)
    elif shape.stored_dtype_bytes != dtype_bytes:
        phase.add("largest weight file's pages, mapped while converted", "cpu", shape.largest_file_bytes)
    return phase


def saved_shard_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """The largest file save_pretrained writes for the model in `dtype_bytes`."""
    return min(shape.total_params * dtype_bytes, SAVE_SHARD_BYTES)
