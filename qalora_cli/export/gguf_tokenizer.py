"""The tokenizer as GGUF metadata, written the way llama.cpp's convert_hf_to_gguf.py writes it:
byte-level BPE (GPT-2 style, e.g. SmolLM2 and Llama 3) as llama.cpp's "gpt2" model with its
pre-tokenizer named, byte-fallback BPE (SentencePiece style, e.g. Llama 2) as its "llama"
model with merge ranks as scores."""

from __future__ import annotations

import json
import logging
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf

from ..errors import UserError

log = logging.getLogger(__name__)

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


def bpe_pre(tokenizer, spec: dict) -> str:
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


def add_tokenizer_kv(w: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None) -> tuple[str, str]:
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
        kind, pre = "gpt2", pre or bpe_pre(tokenizer, spec)
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
    _add_special_tokens(w, tokenizer, probe, plain)
    return kind, pre


def _add_special_tokens(w: gguf.GGUFWriter, tokenizer, probe: list[int], plain: list[int]) -> None:
    """The special token ids, whether encoding adds BOS/EOS (`probe` with special tokens, `plain`
    without), and the chat template."""
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
