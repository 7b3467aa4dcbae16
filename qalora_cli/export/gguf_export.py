"""The merged model as one GGUF file for llama.cpp, ollama and transformers' GGUF loader.

A merged QA-LoRA layer with bits 4, group size 32 and contiguous groups is exactly a GGUF Q4_1
tensor: each block of 32 input weights of one output row stores w = d*q + m with d = s and
m = -s*z' (DESIGN.md, "Formats"). d is already an fp16 value and the codes are copied, so the
only rounding is m to fp16. Norms are F32 and the other float matrices F16 (or F32).

The file is written as a stream: every tensor's header goes first (name, shape, type, which
need no data), then each tensor is loaded, encoded and written in turn, so one layer is in
memory at a time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..quant.result import QuantizedWeight

log = logging.getLogger(__name__)

Q4_1 = gguf.GGMLQuantizationType.Q4_1
BLOCK, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_1]  # 32 weights in 20 bytes: fp16 d, fp16 m, 16 nibble pairs
_EPS32 = float(np.finfo(np.float32).eps)

# llama.cpp names a byte-level BPE pre-tokenizer by hashing the ids its tokenizer gives on this
# text (convert_hf_to_gguf.py, get_vocab_base_pre); the text and the hashes are copied from there.
_CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
           "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
           "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
           "\'\'\'\'\'\'```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
           "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
_KNOWN_PRE = {
    # measured here on SmolLM2-135M's tokenizer (also as transformers rebuilds it from a GGUF)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # from llama.cpp's table, not measured here (no such tokenizer offline)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


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


def _head_counts(config) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def _heads_to_permute(hf_name: str, n_head: int, n_kv: int) -> int | None:
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_kv
    return None


def _add_model_kv(w: gguf.GGUFWriter, config, name: str) -> None:
    n_head, n_kv, head_dim = _head_counts(config)
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


def _bpe_pre(tokenizer, spec: dict) -> str:
    known = _KNOWN_PRE.get(sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest())
    if known:
        return known
    # Not a known tokenizer: name the llama.cpp pre-tokenizer whose regexes are the same as this one's.
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    shape = [(s.get("type"), s.get("use_regex", s.get("individual_digits"))) for s in steps]
    if shape == [("ByteLevel", True)]:
        return "gpt-2"
    if shape == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    log.warning("unknown BPE pre-tokenizer; writing tokenizer.ggml.pre 'default' (llama.cpp may split text "
                "differently from transformers)")
    return "default"


def _looks_special(token: str) -> bool:  # llama.cpp's does_token_look_special, in short
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _byte_level_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and types as llama.cpp's get_vocab_base writes them (ids past the
    tokenizer's vocabulary become unused [PADn] tokens)."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if tok in added:
            special = decoder[i].special or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _llama_vocab(tokenizer, merges: list[str], n_vocab: int):
    """A SentencePiece-style (byte-fallback BPE) tokenizer through gguf's LlamaHfVocab. llama.cpp's
    SPM tokenizer merges the pair with the highest score, so each token scores minus the rank of the
    merge that makes it (LlamaHfVocab gives every token -1000, which loses the merge order)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.vocab.LlamaHfVocab(Path(tmp))
        except (FileNotFoundError, TypeError, ValueError, KeyError) as e:
            raise UserError(f"the gguf export cannot convert this tokenizer ({e}): use --format qalora or gptq") from e
        entries = list(vocab.all_tokens())
    rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
    tokens = [t.decode("utf-8") for t, _, _ in entries]
    scores = [-float(rank.get(t, len(merges))) if r != gguf.TokenType.BYTE else 0.0
              for t, (_, _, r) in zip(tokens, entries)]
    types = [int(r) for _, _, r in entries]
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < len(types):
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1e4)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _add_tokenizer_kv(w: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None) -> tuple[str, str]:
    if len(tokenizer) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # What encoding adds, observed rather than read from flags that differ between tokenizer classes.
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]  # "a b", as llama.cpp
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
        kind, pre = "gpt2", pre or _bpe_pre(tokenizer, spec)
        tokens, types = _byte_level_vocab(tokenizer, n_vocab)
        w.add_add_space_prefix(False)  # as llama.cpp writes for byte-level BPE
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        kind, pre = "llama", "default"
        tokens, scores, types = _llama_vocab(tokenizer, merges, n_vocab)
        w.add_token_scores(scores)
        # llama.cpp's SPM tokenizer prepends a space itself when told to: tell it what this one does.
        w.add_add_space_prefix(tokenizer.convert_ids_to_tokens(plain)[0].startswith("\u2581"))
    else:
        raise UserError(f"the gguf export handles byte-level BPE and byte-fallback BPE tokenizers; this one is "
                        f"'{model.get('type')}' with decoder '{decoder}': use --format qalora or gptq")
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{role}_token_id")(tid)
    w.add_add_bos_token(tokenizer.bos_token_id is not None and len(probe) > len(plain)
                        and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(tokenizer.eos_token_id is not None and len(probe) > len(plain)
                        and probe[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    return kind, pre


def write_gguf(out_file: Path, config, tokenizer, tensors: list[tuple[str, tuple[int, ...], str]],
               load: Callable[[str], torch.Tensor | QuantizedWeight], float_2d: str = "F16",
               *, tokenizer_pre: str | None = None) -> dict:
    """Write the model to `out_file`, loading one tensor at a time in the order of `tensors`
    ((hf name, shape, 'quantized' | 'float')). `tokenizer_pre` overrides the detected
    llama.cpp pre-tokenizer name. Returns {"tensor_types": {type: count}, "bytes", "tokenizer"}."""
    if float_2d not in ("F16", "F32"):
        raise ValueError(f"float_2d must be F16 or F32, not {float_2d!r}")
    out_file = Path(out_file)
    n_head, n_kv, _ = _head_counts(config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []  # (hf name, gguf name, kind, shape, ggml type)
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

    partial = out_file.with_name(out_file.name + ".partial")
    w = gguf.GGUFWriter(partial, "llama")
    try:
        _add_model_kv(w, config, out_file.stem)
        tok_kind, pre = _add_tokenizer_kv(w, tokenizer, config.vocab_size, tokenizer_pre)
        for _, name, _, shape, qtype in plan:
            if qtype == Q4_1:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, Q4_1)
                w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q4_1)
            else:
                dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
                w.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        counts: dict[str, int] = {}
        for hf_name, name, kind, shape, qtype in plan:
            data = _encode(load(hf_name), hf_name, kind, shape, qtype, _heads_to_permute(hf_name, n_head, n_kv))
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


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def verify_gguf_weights(gguf_file: Path, expected: Callable[[str], QuantizedWeight | torch.Tensor],
                        names: list[str]) -> dict:
    """Read the file back (gguf's own reader and dequantizer) and check each named tensor
    against what it must equal. Q4_1: codes and d exactly, the weights within half an fp16 ulp of
    the block's m (plus float32 slack); F16/F32: within their own rounding. Raises UserError on the
    first mismatch; returns {"max_abs_diff", "max_ratio_to_bound", "tensors"}."""
    reader = gguf.GGUFReader(gguf_file)
    n_head, n_kv = _field(reader, "llama.attention.head_count"), _field(reader, "llama.attention.head_count_kv")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, _field(reader, "llama.block_count"))
    stored = {t.name: t for t in reader.tensors}
    worst_diff, worst_ratio, checked = 0.0, 0.0, 0
    for hf_name in names:
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in stored:
            if hf_name == "lm_head.weight" and "output.weight" not in stored:
                continue  # tied embeddings
            raise UserError(f"gguf check: tensor '{hf_name}' ({name}) is missing from {gguf_file}")
        t, want = stored[name], expected(hf_name)
        heads = _heads_to_permute(hf_name, n_head, n_kv)
        unperm = (lambda x: permute_rows(x, heads, inverse=True)) if heads else (lambda x: x)
        got = unperm(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).astype(np.float64)
        if isinstance(want, QuantizedWeight):
            if t.tensor_type != Q4_1:
                raise UserError(f"gguf check: '{hf_name}' is {t.tensor_type.name}, not Q4_1")
            out = got.shape[0]
            blocks = unperm(np.asarray(t.data).reshape(out, -1, BLOCK_BYTES))
            d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
            qs = blocks[..., 4:]
            codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(out, -1)
            if not np.array_equal(codes, want.codes.cpu().numpy()) or \
                    not np.array_equal(d, want.scales.cpu().double().numpy().T):
                raise UserError(f"gguf check: '{hf_name}': codes or scales differ from the merged model")
            ref = want.dequantize().cpu().double().numpy().reshape(out, -1, BLOCK)
            bound = 0.5 * np.spacing(np.abs(m).astype(np.float16)).astype(np.float64) \
                + 4 * _EPS32 * (15 * np.abs(d) + 2 * np.abs(m))
            diff = np.abs(got.reshape(out, -1, BLOCK) - ref)
            ratio = diff / bound[..., None]
        else:
            ref = want.detach().cpu().double().numpy()
            if t.tensor_type == gguf.GGMLQuantizationType.F16:
                bound = 0.5 * np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
            else:
                bound = np.zeros_like(ref)  # F32 holds float32 exactly
            diff = np.abs(got.reshape(ref.shape) - ref)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(diff == 0, 0.0, diff / bound)
        if not (ratio <= 1).all():
            raise UserError(f"gguf check: '{hf_name}' differs from the merged model by {diff.max():.3g}, "
                            f"{ratio.max():.3g} times the rounding of its storage type")
        worst_diff, worst_ratio = max(worst_diff, float(diff.max())), max(worst_ratio, float(ratio.max()))
        checked += 1
    return {"max_abs_diff": worst_diff, "max_ratio_to_bound": worst_ratio, "tensors": checked}
