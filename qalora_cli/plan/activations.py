"""What the training forward pass keeps for the backward pass, per token, counted tensor by tensor
from what autograd saves in a Llama-style block (RMSNorm, attention through SDPA, gated MLP) with
QA-LoRA layers around kernels that keep no input (the weights are frozen, so no weight gradient
needs one: kernels/torch_quant_linear.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import ModelShape


@dataclass(frozen=True)
class Precision:
    model: int     # bytes of the model's float tensors and the residual stream (float32 on the CPU)
    compute: int   # bytes of the autocast type the layers compute in (bf16 / fp16: 2; none: the model's)


def block_saved_per_token(shape: ModelShape, p: Precision, rank: int, group_size: int, dropout: bool) -> int:
    """Bytes one decoder block keeps per token until the backward pass."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    inter = max(lin.out_features for lin in shape.blocks[0])  # the MLP's width
    # RMSNorm upcasts to float32 and keeps its float32 input and normalized output (2 norms); a
    # 16-bit residual stream adds the 16-bit input the upcast came from.
    norms = 2 * (4 * h + 4 * h + (p.model * h if p.model < 4 else 0))
    # SDPA keeps q, k, v (in the compute type) and its output, and one float per head (logsumexp)
    attention = p.compute * (q + 2 * kv + q) + 4 * shape.heads
    # SiLU keeps the gate, the product keeps SiLU's output and the up projection
    mlp = 3 * p.compute * inter
    # each adapter keeps its pooled input (one value per group; plus dropout's mask) and A's output
    adapters = sum((lin.in_features // group_size if group_size > 0 else 1) * (p.compute + (1 if dropout else 0))
                   + rank * p.compute for lin in shape.blocks[0])
    return norms + attention + mlp + adapters


def boundary_per_token(shape: ModelShape, p: Precision) -> int:
    """With gradient checkpointing a block keeps only its input (the residual stream)."""
    return p.model * shape.hidden


def logits_bytes(tokens: int, vocab: int, p: Precision, training: bool) -> int:
    """The output layer at the labelled positions and the cross-entropy over the vocabulary:
    logits in the compute type, their float32 copy and log-softmax (float32); the backward pass
    adds the float32 gradient (recipes' ResponseLoss computes logits only where labels are)."""
    per = p.compute + 4 + 4 + (4 if training else 0)
    return tokens * vocab * per
