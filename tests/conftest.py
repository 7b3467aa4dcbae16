"""Shared fixtures: a tiny random Llama with a real (small, trained here) BPE tokenizer,
saved as a Hugging Face folder, so every stage runs end to end in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Without a GPU, Triton kernels run on the CPU through its interpreter: set before any module
# imports triton, since the flag is read when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qalora_cli.data.builtin_text import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calibration_text()[:60000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Random init gives near-zero weights; widen them so quantization error is visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama folder (config, safetensors weights, tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_config_dict(model_dir, out_dir, **quantize):
    q = {"method": "gptq", "bits": 4, "group_size": 32, "device": "cpu", "batch_size": 4}
    q.update(quantize)
    return {
        "model": {"name_or_path": str(model_dir)},
        "quantize": q,
        "calibration": {"source": "builtin", "num_samples": 8, "seq_len": 64, "seed": 0},
        "output": {"dir": str(out_dir)},
    }


# A chat template for the tiny tokenizer (generate/chat/eval stream tests)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def text_ids(tok, n):
    """The first n tokens of the built-in held-out text."""
    from qalora_cli.data.builtin_text import heldout_text

    return tok(heldout_text(), add_special_tokens=False)["input_ids"][:n]


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    make_tiny_llama(len(tok), max_position_embeddings=512).save_pretrained(path)
    tok.save_pretrained(path)
    return path
