"""What the training forward pass keeps for the backward pass, per token, counted tensor by tensor
from what autograd saves in a Llama-style block (RMSNorm, attention through SDPA, gated MLP) whose
weights are frozen: a frozen layer keeps no input (no weight gradient needs one; QA-LoRA's
kernels, kernels/torch_quant_linear.py, nn.Linear and bitsandbytes' Linear4bit alike). Only the
adapters keep theirs. Checked against the tensors autograd holds (saved_tensors_hooks) on a
PEFT LoRA and a QLoRA Llama on the CPU, the count below is theirs to the byte (every block but
the first, whose input needs no gradient and keeps a little less)."""

from __future__ import annotations

from dataclasses import dataclass

from .quantized_bytes import groups_of
from .shapes import ModelShape


@dataclass(frozen=True)
class Precision:
    model: int     # bytes of the model's float tensors and the residual stream (float32 on the CPU)
    compute: int   # bytes of the autocast type the layers compute in (bf16 / fp16: 2; none: the model's)


@dataclass(frozen=True)
class AdapterInputs:
    """What each adapter keeps, per input value it reads, until the backward pass."""
    group_size: int  # input columns averaged into one value (QA-LoRA's pooling); 1: every input (LoRA)
    kept: int        # bytes of the type A's matmul runs in: it keeps its input and B keeps A's output
    mask: int        # bytes of dropout's mask per value; 0 without dropout


def dropout_mask_bytes(dropout: float, device: str, input_bytes: int) -> int:
    """CUDA's fused dropout keeps a bool mask; elsewhere at::dropout multiplies the input by a noise
    tensor of the input's dtype, which autograd keeps."""
    if dropout <= 0:
        return 0
    return 1 if device == "cuda" else input_bytes


def block_saved_per_token(shape: ModelShape, p: Precision, rank: int, adapters: AdapterInputs) -> int:
    """Bytes one decoder block keeps per token until the backward pass."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    inter = max(lin.out_features for lin in shape.blocks[0])  # the MLP's width
    # RMSNorm keeps its input in float32 (a 16-bit stream's upcast copy, or the float32 stream
    # itself) for pow and the normalizing product; the frozen weight's product keeps nothing
    norms = 2 * 4 * h
    # SDPA keeps q, k, v (in the compute type) and its output, and one float per head (logsumexp)
    attention = p.compute * (q + 2 * kv + q) + 4 * shape.heads
    # SiLU keeps the gate, the product keeps SiLU's output and the up projection
    mlp = 3 * p.compute * inter
    a = adapters
    kept = sum(groups_of(lin, a.group_size) * (a.kept + a.mask) + rank * a.kept for lin in shape.blocks[0])
    return norms + attention + mlp + kept


def boundary_per_token(shape: ModelShape, p: Precision) -> int:
    """With gradient checkpointing a block keeps only its input (the residual stream)."""
    return p.model * shape.hidden


def logits_bytes(tokens: int, vocab: int, p: Precision, training: bool) -> int:
    """The output layer at the labelled positions and the cross-entropy over the vocabulary:
    logits in the compute type, their float32 copy and log-softmax (float32); the backward pass
    adds the float32 gradient (recipes' ResponseLoss computes logits only where labels are)."""
    per = p.compute + 4 + 4 + (4 if training else 0)
    return tokens * vocab * per
