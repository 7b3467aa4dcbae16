"""The merged model as one GGUF file for llama.cpp, ollama and transformers' GGUF loader.

A merged QA-LoRA layer with bits 4, group size 32 and contiguous groups is exactly a GGUF Q4_1
tensor: each block of 32 input weights of one output row stores w = d*q + m with d = s and
m = -s*z' (docs/DESIGN.md, "Formats"). d is already an fp16 value and the codes are copied, so
the only rounding is m to fp16. Norms are F32 and the other float matrices F16 (or F32).

The file is written as a stream: every tensor's header goes first (name, shape, type, which
need no data), then each tensor is loaded, encoded and written in turn, so one layer is in
memory at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..quant.result import QuantizedWeight
from .gguf_tokenizer import add_tokenizer_kv

Q4_1 = gguf.GGMLQuantizationType.Q4_1
BLOCK, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_1]  # 32 weights in 20 bytes: fp16 d, fp16 m, 16 nibble pairs


def check_gguf_compatible(model_type: str, bits: int, group_size: int, contiguous: bool) -> None:
    """Refuse, in one line, a model whose layers Q4_1 cannot hold exactly."""
    if (model_type, bits, group_size, contiguous) == ("llama", 4, BLOCK, True):
        return
    groups = "contiguous groups" if contiguous else "act-order groups"
    raise UserError(f"the gguf format needs a llama model with bits 4, group size {BLOCK} and contiguous groups "
                    f"(Q4_1); this model has model_type '{model_type}', bits {bits}, group size {group_size}, "
                    f"{groups}: use --format qalora or gptq")


def permute_rows(x, n_head: int, inverse: bool = False):
    """llama.cpp's LlamaModel.permute on the first dim (output rows) of q_proj / k_proj: within each
    head it interleaves the two rotary halves. Rows are whole, so 32-wide input blocks stay intact."""
    rows = x.shape[0]
    split = (n_head, 2, rows // n_head // 2) if not inverse else (n_head, rows // n_head // 2, 2)
    return x.reshape(*split, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def pack_q4_1(qw: QuantizedWeight) -> np.ndarray:
    """Q4_1 blocks of `qw` as uint8 [out, in/32 * 20]; reads back as qw.dequantize() up to m's fp16 rounding."""
    out, n_in = qw.codes.shape
    nb = n_in // BLOCK
    if qw.bits != 4 or n_in % BLOCK or not torch.equal(qw.g_idx.long().cpu(), torch.arange(n_in) // BLOCK):
        raise ValueError("pack_q4_1 needs bits 4 and contiguous groups of 32")
    if int(qw.codes.min()) < 0 or int(qw.codes.max()) > 15:
        raise ValueError("pack_q4_1: codes outside [0, 15]")
    s = qw.scales.detach().cpu().double().numpy().T  # [out, nb]: block b of row o is group b
    d = s.astype(np.float16)
    if not np.array_equal(d.astype(np.float64), s):
        raise UserError("the scales are not fp16 values, so Q4_1 cannot store them exactly: use --format qalora")
    # numpy rounds float64 -> float16 once (torch would go through float32 and could round twice)
    m = (-s * qw.zeros.detach().cpu().double().numpy().T).astype(np.float16)
    if not np.isfinite(m).all():
        raise UserError("a zero point times its scale overflows fp16: use --format qalora")
    q = qw.codes.detach().cpu().numpy().astype(np.uint8).reshape(out, nb, 2, BLOCK // 2)
    nibbles = q[:, :, 0] | (q[:, :, 1] << np.uint8(4))  # weight j in the low nibble, j+16 in the high one
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), nibbles], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, nb * BLOCK_BYTES))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"the gguf export supports plain RoPE only; this model uses rope_type '{kind}': "
                        "use --format qalora or gptq")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_counts(config) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def heads_to_permute(hf_name: str, n_head: int, n_kv: int) -> int | None:
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_kv
    return None


def _add_model_kv(w: gguf.GGUFWriter, config, name: str) -> None:
    n_head, n_kv, head_dim = head_counts(config)
    w.add_name(name)
    w.add_type("model")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:  # llama.cpp assumes hidden / heads otherwise
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_bool("qalora.merged", True)


def write_gguf(out_file: Path, config, tokenizer, tensors: list[tuple[str, tuple[int, ...], str]],
               load: Callable[[str], torch.Tensor | QuantizedWeight], float_2d: str = "F16",
               *, tokenizer_pre: str | None = None) -> dict:
    """Write the model to `out_file`, loading one tensor at a time in the order of `tensors`
    ((hf name, shape, 'quantized' | 'float')). `tokenizer_pre` overrides the detected
    llama.cpp pre-tokenizer name. Returns {"tensor_types": {type: count}, "bytes", "tokenizer"}."""
    if float_2d not in ("F16", "F32"):
        raise ValueError(f"float_2d must be F16 or F32, not {float_2d!r}")
    out_file = Path(out_file)
    n_head, n_kv, _ = head_counts(config)
    plan = _tensor_plan(config, tensors, float_2d)
    partial = out_file.with_name(out_file.name + ".partial")
    w = gguf.GGUFWriter(partial, "llama")
    try:
        _add_model_kv(w, config, out_file.stem)
        tok_kind, pre = add_tokenizer_kv(w, tokenizer, config.vocab_size, tokenizer_pre)
        _add_tensor_infos(w, plan)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        counts: dict[str, int] = {}
        for hf_name, name, kind, shape, qtype in plan:
            data = _encode(load(hf_name), hf_name, kind, shape, qtype, heads_to_permute(hf_name, n_head, n_kv))
            w.write_tensor_data(data)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        w.close()
        os.replace(partial, out_file)
    except BaseException:
        w.close()
        partial.unlink(missing_ok=True)
        raise
    return {"tensor_types": counts, "bytes": out_file.stat().st_size,
            "tokenizer": {"model": tok_kind, "pre": pre}}


def _tensor_plan(config, tensors: list[tuple[str, tuple[int, ...], str]], float_2d: str) -> list[tuple]:
    """-> [(hf name, gguf name, kind, shape, ggml type)], the tied lm_head left out."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    for hf_name, shape, kind in tensors:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor '{hf_name}' has no llama.cpp name: the gguf export handles plain LLaMA models")
        if kind == "quantized":
            qtype = Q4_1
        else:
            qtype = gguf.GGMLQuantizationType[float_2d] if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        plan.append((hf_name, name, kind, tuple(shape), qtype))
    return plan


def _add_tensor_infos(w: gguf.GGUFWriter, plan: list[tuple]) -> None:
    """Every tensor's header (name, shape, type): known before any data is loaded."""
    for _, name, _, shape, qtype in plan:
        if qtype == Q4_1:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, Q4_1)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q4_1)
        else:
            dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
            w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)


def _encode(value, hf_name: str, kind: str, shape: tuple, qtype, heads: int | None) -> np.ndarray:
    if kind == "quantized":
        if not isinstance(value, QuantizedWeight) or tuple(value.codes.shape) != shape:
            raise ValueError(f"{hf_name}: expected a QuantizedWeight of shape {shape}")
        data = pack_q4_1(value)
    else:
        if not torch.is_tensor(value) or tuple(value.shape) != shape:
            raise ValueError(f"{hf_name}: expected a float tensor of shape {shape}")
        data = value.detach().cpu().float().numpy().astype(np.float16 if qtype.name == "F16" else np.float32)
        if not np.isfinite(data).all():
            raise UserError(f"{hf_name}: values overflow {qtype.name}; try float_2d F32")
    # Rows of the packed blocks are output rows, so q/k are permuted after packing.
    return np.ascontiguousarray(permute_rows(data, heads)) if heads else data
