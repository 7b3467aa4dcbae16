"""The token loop shared by `generate` and `chat`: read tokens into a cache (in chunks that
fit beside the sinks), sample the next one, and turn tokens into text as they come."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch

DEFAULT_CHUNK = 512  # prompt tokens per forward: bounded activation memory on long prompts


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


@torch.inference_mode()
def feed(model, cache, ids: list[int], chunk: int = DEFAULT_CHUNK, all_logits: bool = False) -> torch.Tensor:
    """Run `ids` through the model on top of `cache`, evicting before each chunk as needed.
    -> the logits of the last token [vocab] (or of every token [n, vocab] with all_logits)."""
    device = next(model.parameters()).device
    step = min(chunk, cache.window) if cache.capacity is not None else chunk
    outs = []
    for i in range(0, len(ids), step):
        part = ids[i:i + step]
        cache.make_room(len(part))
        start = cache.get_seq_length()
        positions = torch.arange(start, start + len(part), device=device).unsqueeze(0)
        out = model(input_ids=torch.tensor([part], device=device), use_cache=True, position_ids=positions,
                    logits_to_keep=0 if all_logits else 1, **{cache_argument(model): cache})
        logits = out.logits[0]
        outs.append(logits if logits.dtype == torch.float64 else logits.float())
    return torch.cat(outs) if all_logits else outs[-1][-1]


def cache_argument(model) -> str:
    """The forward's name for the cache: `cache` in recent transformers, `past_key_values` before."""
    return _cache_argument(type(model))


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling (the smallest set of tokens whose
    probability reaches top_p, always at least the most likely one)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # mass before this token already reaches top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_tokens(model, cache, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
                    stop_ids: set[int]) -> Iterator[int]:
    """Yield new tokens one by one; the stop token ends the stream and is not fed."""
    device = next(model.parameters()).device
    generator = sampling.generator(device)
    logits = feed(model, cache, prompt_ids)
    for _ in range(max_new_tokens):
        token = sample(logits, sampling, generator)
        if token in stop_ids:
            return
        yield token
        logits = feed(model, cache, [token])


class TextStream:
    """Token ids in, text out as soon as it is stable: a token that ends inside a multi-byte
    character or whose spacing depends on the next one is held until it is settled. Decodes a
    short trailing span, not the whole text, so cost stays flat over long generations."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is decoded context; ids[read:] not yet shown

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
