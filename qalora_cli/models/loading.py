"""Load a full-precision causal LM and its tokenizer from any ModelSource."""

from __future__ import annotations

from pathlib import Path

from ..config.schema import ModelSection
from ..dtypes import DTYPES  # callers import it from here too
from ..errors import UserError, first_line
from . import gguf_cache
from .source import resolve_source

__all__ = ["DTYPES", "check_tokenizer", "load_model", "load_tokenizer", "quiet_transformers"]


def load_model(m: ModelSection, device: str = "cpu"):
    """-> (model in eval mode on `device`, tokenizer, source)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    src = resolve_source(m)
    converted = gguf_cache.converted_folder(src, m.dtype)
    from_cache = gguf_cache.is_complete(converted)
    location = str(converted) if from_cache else src.location
    kw = dict(trust_remote_code=m.trust_remote_code) if from_cache else \
        dict(gguf_file=src.gguf_file, revision=src.revision, trust_remote_code=m.trust_remote_code)
    try:
        tokenizer = check_tokenizer(AutoTokenizer.from_pretrained(location, **kw))
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[m.dtype], **kw)
    except Exception as e:  # the loading boundary: corrupt files, missing weights, no network
        raise UserError(f"could not load the model '{src.describe()}': {first_line(e)}") from e
    if from_cache:
        model.config._name_or_path = src.location  # as the GGUF load names it
    elif src.gguf_file:
        # transformers dequantizes GGUF weights at load; nothing quantized remains, so the
        # model must not claim a quantizer when saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if converted is not None:
            gguf_cache.store(model, tokenizer, converted, Path(src.location) / src.gguf_file)
    model.eval().to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, src


def load_tokenizer(path):
    """A model folder's tokenizer (AutoTokenizer); damaged tokenizer files are refused in one line."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return check_tokenizer(AutoTokenizer.from_pretrained(path))
    except Exception as e:  # the loading boundary: tokenizer.json, tokenizer_config.json, ...
        raise UserError(f"'{path}': could not load its tokenizer: {first_line(e)}") from e


def check_tokenizer(tokenizer):
    """Encode and decode a probe: a tokenizer whose files load but hold values of the wrong type
    (e.g. a list as model_max_length) fails here, inside the loading boundary, not mid-run."""
    ids = tokenizer("Hello, world.\nHi")["input_ids"]
    tokenizer.decode(ids)
    return tokenizer


def quiet_transformers() -> None:
    """qalora shows its own progress; transformers' per-file bars and notices are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
