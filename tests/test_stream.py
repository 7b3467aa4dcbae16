"""Attention sinks (StreamingLLM): the cache against independent references (the plain cache
before it fills; keys cached before RoPE and rotated for their place in the cache, as the
paper's code does, after), the token loop, the text stream, conversations, and the CLI of
`generate`, `chat` (through a pseudo-terminal) and `eval stream`."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from typer.testing import CliRunner

from helpers import CHAT_TEMPLATE as TEMPLATE, make_tiny_llama, make_tokenizer, merge_cli, text_ids
from qalora_cli.cli.app import app
from qalora_cli.errors import UserError
from qalora_cli.stream.caches import FullCache
from qalora_cli.stream.conversation import Conversation
from qalora_cli.stream.decode import Sampling, TextStream, feed, generate_tokens, sample
from qalora_cli.stream.sink_cache import SinkCache, rotate_keys

runner = CliRunner()

@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    model = make_tiny_llama(len(tok), max_position_embeddings=512).double().eval()
    return model, tok


def stepwise_logits(model, cache, ids):
    return torch.stack([feed(model, cache, [t]) for t in ids])


def test_until_full_the_sink_cache_is_the_plain_cache(tiny):
    model, tok = tiny
    ids = text_ids(tok, 40)
    sink = stepwise_logits(model, SinkCache(model, 4, 36), ids)  # holds exactly 40: nothing evicted
    full = model(input_ids=torch.tensor([ids])).logits[0]  # one dense forward, the library's own path
    assert torch.equal(sink, stepwise_logits(model, FullCache(model), ids))
    torch.testing.assert_close(sink, full, rtol=0, atol=1e-10)


def capture_pre_rope_keys(model):
    """Hooks on every k_proj: the keys each token had before RoPE, in text order."""
    keys = {i: [] for i in range(len(model.model.layers))}
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads

    def hook(i):
        def f(_m, _inp, out):  # [1, n, kv * hd] -> [1, kv, n, hd]
            keys[i].append(out.view(1, out.shape[1], cfg.num_key_value_heads, hd).transpose(1, 2))
        return f
    handles = [layer.self_attn.k_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    return keys, handles


@pytest.mark.parametrize("sinks,window", [(4, 12), (0, 16), (1, 7)])
def test_after_eviction_keys_sit_at_their_place_in_the_cache(tiny, sinks, window):
    """The reference is the paper's design: keys kept before RoPE, rotated with arange(cache)."""
    model, tok = tiny
    ids = text_ids(tok, 57)
    cache = SinkCache(model, sinks, window)
    keys, handles = capture_pre_rope_keys(model)
    try:
        stepwise_logits(model, cache, ids)
    finally:
        for h in handles:
            h.remove()
    kept = list(range(sinks)) + list(range(len(ids) - window, len(ids)))
    assert cache.get_seq_length() == sinks + window and cache.evicted == len(ids) - sinks - window
    for i, layer in enumerate(cache.layers):
        pre = torch.cat(keys[i], dim=2)[:, :, kept]
        cos, sin = model.model.rotary_emb(pre, torch.arange(len(kept)).unsqueeze(0))
        want, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
        # the library computes its angles p * inv_freq in float32 (a float64 model included), so
        # rotating by p, then by -d, differs from rotating by p - d by float32 angle rounding
        torch.testing.assert_close(layer.keys, want, rtol=0, atol=3e-6)


def test_rotation_composes_and_inverts():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(rotate_keys(rotate_keys(k, 7, inv_freq), -7, inv_freq), k, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_keys(rotate_keys(k, 3, inv_freq), 4, inv_freq), rotate_keys(k, 7, inv_freq))


def test_prompts_longer_than_the_window_are_read_in_chunks(tiny):
    model, tok = tiny
    ids = text_ids(tok, 300)
    cache = SinkCache(model, 4, 28)
    logits = feed(model, cache, ids, chunk=16)
    assert cache.get_seq_length() <= 32 and cache.evicted == 300 - cache.get_seq_length()
    assert torch.isfinite(logits).all()
    cache2 = SinkCache(model, 4, 28)
    feed(model, cache2, ids, chunk=1000)  # the chunk is cut to the window
    assert cache2.get_seq_length() <= 32


def test_generation_runs_at_flat_memory(tiny):
    model, tok = tiny
    cache = SinkCache(model, 2, 30)
    lengths, sizes = [], set()
    for i, _ in enumerate(generate_tokens(model, cache, text_ids(tok, 10), 2000, Sampling(), stop_ids=set())):
        lengths.append(cache.get_seq_length())
        if i > 40:
            sizes.add(cache.nbytes())
    assert len(lengths) == 2000 and max(lengths) == 32 and len(sizes) == 1 and cache.evicted > 1900


def test_sampling():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, Sampling(), None) == 1
    assert sample(logits, Sampling(temperature=1.0, top_p=1e-6), None) == 1  # nucleus of one
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    draws = [sample(logits, Sampling(temperature=1.0, top_p=0.8), g()) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in (1, 2)  # seeded; only the top tokens within 0.8
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[sample(logits, Sampling(temperature=1.0), gen)] += 1
    torch.testing.assert_close(counts / 4000, torch.softmax(logits, 0), rtol=0, atol=0.03)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40))
def test_text_stream_gives_exactly_the_decoded_text(text):
    tok = _shared_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)


_TOK = []


def _shared_tokenizer():
    if not _TOK:
        _TOK.append(make_tokenizer())
    return _TOK[0]


def test_a_conversation_reads_each_turn_once_and_survives_eviction(tiny):
    model, tok = tiny
    conv = Conversation(model, tok, lambda: FullCache(model), Sampling(), 6, template=True, stop_ids=set())
    "".join(conv.reply("first question"))
    "".join(conv.reply("and a second one"))
    rendered = tok.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=False)
    # the cache holds the whole conversation but the closing of the last reply, read once
    assert rendered.startswith(conv.fed) and conv.cache.get_seq_length() == conv.tokens_read
    sinks = Conversation(model, tok, lambda: SinkCache(model, 4, 20), Sampling(), 8, template=True, stop_ids=set())
    first = None
    for turn in range(6):
        "".join(sinks.reply(f"turn {turn}: tell me more about the topic"))
        k = sinks.cache.layers[0].keys[..., :4, :].clone()
        first = k if first is None else first
        assert torch.equal(k, first)  # the sinks stay for good
    assert sinks.cache.evicted > 0 and sinks.cache.get_seq_length() <= 24
    sinks.reset()
    assert sinks.cache.get_seq_length() == 0 and sinks.messages == []


def test_a_stopped_reply_rebuilds_the_cache_from_the_conversation(tiny):
    model, tok = tiny
    conv = Conversation(model, tok, lambda: FullCache(model), Sampling(), 20, template=True, stop_ids=set())
    for i, _ in enumerate(conv.reply("hello")):
        if i == 2:
            break  # as Ctrl-C does
    assert conv.cache is None and conv.messages[-1]["role"] == "assistant"
    "".join(conv.reply("again"))
    assert conv.cache.get_seq_length() == len(tok(conv.fed, add_special_tokens=False)["input_ids"]) + \
        conv.last["new_tokens"] - len(tok(conv.messages[-1]["content"], add_special_tokens=False)["input_ids"])


def test_models_without_usable_rope_are_refused(tiny):
    model, tok = tiny
    cfg = model.config.to_dict()
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    from transformers import LlamaConfig, LlamaForCausalLM

    dyn = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.raises(UserError, match="dynamic"):
        SinkCache(dyn, 4, 16)


# ---- the CLI ----------------------------------------------------------------------------------

def cli(*args):
    return runner.invoke(app, [*args, "--device", "cpu", "--dtype", "float32"])


def reference_greedy(folder, prompt: str, n: int) -> str:
    """transformers' own generate, greedy, plain cache: the independent reference."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("cache", ["full", "sinks"])
def test_generate_equals_transformers_greedy_until_the_cache_is_full(chat_model_dir, cache):
    prompt = "The attention sinks keep"
    r = cli("generate", "--model", str(chat_model_dir), "--prompt", prompt, "--raw", "--max-new-tokens", "30",
            "--ignore-eos", "--cache", cache, "--window", "60")
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == reference_greedy(chat_model_dir, prompt, 30)
    assert "generated 30 tokens" in r.stderr


@pytest.fixture(scope="module")
def kinds(bases, tiny_model_dir, tmp_path_factory):
    """Every model kind `eval` loads, as --model arguments: float folder, GPTQ checkpoint, the
    checkpoint with its adapter, and the adapter merged (qalora format)."""
    merged = tmp_path_factory.mktemp("stream-kinds") / "merged"
    assert merge_cli(bases["act"], bases["adapter"], merged, "--no-verify").exit_code == 0
    return {"float": [str(tiny_model_dir)], "gptq": [str(bases["act"])],
            "adapter": [str(bases["act"]), "--adapter", str(bases["adapter"])], "merged": [str(merged)]}


def reference_on_loaded(args, prompt: str, n: int) -> str:
    from qalora_cli.eval.model_loading import load_eval_model

    adapter = args[2] if len(args) > 1 else None
    model, tok, _ = load_eval_model(args[0], adapter and __import__("pathlib").Path(adapter), "cpu", "float32")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["float", "gptq", "adapter", "merged"])
def test_generate_on_every_model_kind(kinds, kind):
    prompt = "Streaming keeps the first tokens"
    r = cli("generate", "--model", *kinds[kind], "--prompt", prompt, "--raw", "--max-new-tokens", "20",
            "--ignore-eos", "--cache", "full")
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == reference_on_loaded(kinds[kind], prompt, 20)
    long = cli("generate", "--model", *kinds[kind], "--prompt", prompt, "--raw", "--max-new-tokens", "150",
               "--ignore-eos", "--sinks", "4", "--window", "28")
    assert long.exit_code == 0, long.output
    assert "generated 150 tokens" in long.stderr and "32 tokens held" in long.stderr


def test_the_merged_model_generates_what_the_adapter_does(kinds):
    prompt = "A merged adapter"
    outs = [cli("generate", "--model", *kinds[k], "--prompt", prompt, "--raw", "--max-new-tokens", "24",
                "--ignore-eos").stdout for k in ("adapter", "merged", "gptq")]
    assert outs[0] == outs[1] != outs[2]


def test_generate_applies_the_chat_template_unless_raw(chat_model_dir):
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    prompt = "What is a sink?"
    templated = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    r = cli("generate", "--model", str(chat_model_dir), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos")
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") == reference_greedy(chat_model_dir, templated, 12)


def test_prompt_file_and_sampling_seed(chat_model_dir, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Once upon a time", encoding="utf-8")
    args = ["generate", "--model", str(chat_model_dir), "--prompt-file", str(f), "--raw", "--max-new-tokens", "16",
            "--ignore-eos", "--temperature", "1.0", "--top-p", "0.9"]
    a, b, c = cli(*args, "--seed", "3"), cli(*args, "--seed", "3"), cli(*args, "--seed", "4")
    assert a.exit_code == 0 and a.stdout == b.stdout != c.stdout


@pytest.mark.parametrize("args,words", [
    (["--prompt", "x", "--prompt-file", "p.txt"], "exactly one of --prompt"),
    ([], "exactly one of --prompt"),
    (["--prompt-file", "missing.txt"], "missing.txt"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x", "--sinks", "-1"], "--sinks"),
    (["--prompt", "x", "--window", "0"], "--window"),
    (["--prompt", "x", "--cache", "paged"], "--cache"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
])
def test_generate_bad_input_is_one_line_and_exit_2(chat_model_dir, args, words):
    r = cli("generate", "--model", str(chat_model_dir), *args)
    assert r.exit_code == 2, r.output
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_chat_template_needs_raw(tiny_model_dir):
    r = cli("generate", "--model", str(tiny_model_dir), "--prompt", "x")
    assert r.exit_code == 2 and "--raw" in r.stderr


def test_an_mlx_folder_is_refused_with_the_runtime_to_use(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": {"group_size": 32,
                                                                                              "bits": 4}}))
    r = cli("generate", "--model", str(tmp_path), "--prompt", "x")
    assert r.exit_code == 2 and "mlx" in r.stderr.lower()


# ---- chat through a pseudo-terminal -----------------------------------------------------------

def test_chat_in_a_terminal(chat_model_dir):
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    main, child = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qalora_cli", "chat", "--model", str(chat_model_dir),
                             "--max-new-tokens", "8", "--ignore-eos", "--window", "40", "--device", "cpu"],
                            stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
    os.close(child)
    seen = b""

    def until(marker: bytes, timeout=120.0):
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen:
            assert time.time() < end, f"no {marker!r} in {seen[-400:]!r}"
            if select.select([main], [], [], 0.5)[0]:
                try:
                    seen += os.read(main, 4096)
                except OSError:
                    break
        found, seen = seen, b""
        return found

    def type_line(text: str):
        for ch in text:  # a person types character by character
            os.write(main, ch.encode())
            time.sleep(0.005)
        os.write(main, b"\r")

    try:
        until(b"> ")
        for turn in range(8):  # 8 turns of ~20 tokens: past the 44-token cache
            type_line(f"question {turn} about the sinks")
            reply = until(b"> ")
            assert b"question" in reply  # the terminal echoes the typing, then the reply streams
        type_line("/reset")
        assert b"(conversation reset)" in until(b"> ")
        type_line("/exit")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)
