"""Bytes of quantized linear layers as TorchQuantLinear holds them (and GPTQ files store them):
`qweight` (codes packed in int32 words), `qzeros` (packed) or float32 `zeros` (merged), `scales`
in the scale dtype, `g_idx` (int32, one per input column)."""

from __future__ import annotations

from .shapes import LinearShape, ModelShape


def groups_of(lin: LinearShape, group_size: int) -> int:
    return 1 if group_size == -1 else lin.in_features // group_size


def packed_layer_bytes(lin: LinearShape, bits: int, group_size: int, scale_bytes: int,
                       float_zeros: bool = False) -> int:
    groups = groups_of(lin, group_size)
    qweight = lin.weights * bits // 8
    zeros = groups * lin.out_features * (4 if float_zeros else bits / 8)
    scales = groups * lin.out_features * scale_bytes
    g_idx = lin.in_features * 4
    bias = lin.out_features * scale_bytes if lin.bias else 0
    return int(qweight + zeros + scales + g_idx + bias)


def packed_model_bytes(shape: ModelShape, bits: int, group_size: int, scale_bytes: int,
                       float_zeros: bool = False) -> int:
    """Every quantized linear layer of the decoder blocks, packed."""
    return sum(packed_layer_bytes(lin, bits, group_size, scale_bytes, float_zeros) for lin in shape.linears())


def float_part_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """What stays in floating point: embeddings, norms, output layer (biases are with the layers)."""
    return (shape.outside_params + shape.block_other_params) * dtype_bytes


def bits_and_group(shape: ModelShape, fallback_bits: int, fallback_group: int) -> tuple[int, int]:
    """A checkpoint's bits and group size, or the config's when the model is not quantized yet."""
    q = shape.quantization or {}
    return int(q.get("bits", fallback_bits)), int(q.get("group_size", fallback_group))


# bitsandbytes 4-bit as finetune.method qlora loads it (lora/peft_models._nf4_config: NF4, double
# quantization, the blocksize left at bitsandbytes' 64): one absmax per 64 weights, and with double
# quantization those absmax are themselves quantized to 8 bits, a float32 absmax per 256 of them.
NF4_BLOCK, NF4_ABSMAX_BLOCK = 64, 256


def nf4_layer_bytes(lin: LinearShape, half_bytes: int) -> int:
    """A Linear4bit: 4-bit codes (two a byte), the 8-bit absmax of each block, the float32 absmax
    of each 256 blocks; the bias stays in the 16-bit type. The code tables are shared by all layers."""
    blocks = -(-lin.weights // NF4_BLOCK)
    absmax_blocks = -(-blocks // NF4_ABSMAX_BLOCK)
    bias = lin.out_features * half_bytes if lin.bias else 0
    return -(-lin.weights // 2) + blocks + 4 * absmax_blocks + bias


def nf4_model_bytes(shape: ModelShape, half_bytes: int) -> int:
    """Every linear layer of the decoder blocks in NF4 (transformers keeps the output layer, the
    embeddings and the norms in the 16-bit type)."""
    return sum(nf4_layer_bytes(lin, half_bytes) for lin in shape.linears())
