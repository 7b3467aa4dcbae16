"""The embedded SmolLM2 GGUF converted once and loaded from the converted folder afterwards
(qalora_cli/models/gguf_cache.py): the second load is transformers' GGUF load, exactly: every
weight, the config, the tokenizer's encodings and chat template, the generation config."""

import pytest
import torch

from qalora_cli.config.loader import load_config
from qalora_cli.models import gguf_cache
from qalora_cli.models.loading import load_model
from qalora_cli.models.source import resolve_source

pytestmark = pytest.mark.slow

PROBE = "Hello, world! <|im_start|>user\nWhat is 2+2?<|im_end|>\n  ünïcode 123\t\ttabs"


def test_a_gguf_load_is_converted_once_and_the_copy_loads_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QALORA_CACHE_DIR", str(tmp_path / "cache"))
    m = load_config("smollm2-135m-int4").model
    folder = gguf_cache.converted_folder(resolve_source(m), m.dtype)
    assert folder.parent.parent == tmp_path / "cache" and not folder.exists()

    gguf_model, gguf_tok, _ = load_model(m)  # through transformers' GGUF loader; stores the copy
    assert gguf_cache.is_complete(folder) and [p.name for p in folder.parent.iterdir()] == [folder.name]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    copy_model, copy_tok, _ = load_model(m)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # read, not written again

    a, b = gguf_model.state_dict(), copy_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert gguf_model.config.to_dict() == copy_model.config.to_dict()
    assert gguf_model.generation_config.to_dict() == copy_model.generation_config.to_dict()
    assert gguf_tok(PROBE).input_ids == copy_tok(PROBE).input_ids
    assert gguf_tok.chat_template == copy_tok.chat_template
    assert (gguf_tok.bos_token, gguf_tok.eos_token, gguf_tok.pad_token) == \
        (copy_tok.bos_token, copy_tok.eos_token, copy_tok.pad_token)


def test_a_cache_that_cannot_be_written_leaves_nothing_and_the_load_goes_on(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"  # the cache's place is under a file: every write fails, for root too
    blocker.write_text("")
    monkeypatch.setenv("QALORA_CACHE_DIR", str(blocker / "cache"))
    model, _, _ = load_model(load_config("smollm2-135m-int4").model)
    assert model.config.num_hidden_layers == 30 and list(tmp_path.iterdir()) == [blocker]


def test_the_cache_is_keyed_by_dtype_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("QALORA_CACHE_DIR", str(tmp_path))
    m = load_config("smollm2-135m-int4").model
    src = resolve_source(m)
    assert gguf_cache.converted_folder(src, "float32") != gguf_cache.converted_folder(src, "bfloat16")
    monkeypatch.setenv("QALORA_GGUF_CACHE", "0")
    assert gguf_cache.converted_folder(src, "float32") is None
