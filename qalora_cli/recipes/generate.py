"""Generation with attention sinks (StreamingLLM) on every model kind load_eval_model loads:
the settings `qalora generate` and `qalora chat` share, checked before any model loads, and the
conversation they run on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .evaluate import require_model


@dataclass
class GenerationSettings:
    model: str | None
    adapter: str | Path | None
    max_new_tokens: int = 256
    sinks: int = 4
    window: int = 1020
    cache: str = "sinks"  # sinks (attention sinks + window) or full
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    raw: bool = False  # the text as it is, without the chat template
    ignore_eos: bool = False
    device: str = "auto"
    dtype: str = "auto"
    kernel: str = "auto"

    def __post_init__(self):
        require_model(self.model, self.adapter)
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.cache not in ("sinks", "full"):
            raise UserError(f"--cache {self.cache!r}: use sinks (attention sinks + window) or full")
        if self.sinks < 0 or self.window < 1:
            raise UserError(f"--sinks must be 0 or more and --window at least 1 (got {self.sinks}, {self.window})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"--temperature must be 0 (greedy) or more and --top-p in (0, 1] (got "
                            f"{self.temperature}, {self.top_p})")

    def describe_cache(self) -> str:
        return "full cache" if self.cache == "full" else f"sinks {self.sinks} + window {self.window}"


def start_conversation(s: GenerationSettings, system: str | None = None):
    """-> (a Conversation on the loaded model, the model's name)."""
    from ..eval.exact_match import stop_token_ids
    from ..eval.model_loading import load_eval_model
    from ..stream.caches import make_cache
    from ..stream.conversation import Conversation
    from ..stream.decode import Sampling

    model, tokenizer, name = load_eval_model(s.model, s.adapter, s.device, s.dtype, s.kernel)
    make_cache(model, s.cache, s.sinks, s.window)  # refuses a model without RoPE before any reading
    stops = set() if s.ignore_eos else set(stop_token_ids(model, tokenizer))
    conversation = Conversation(model, tokenizer, lambda: make_cache(model, s.cache, s.sinks, s.window),
                                Sampling(s.temperature, s.top_p, s.seed), s.max_new_tokens, template=not s.raw,
                                stop_ids=stops, system=system)
    return conversation, name


def generation_summary(chat, s: GenerationSettings) -> str:
    """The last reply's timing and the cache it left, in one line."""
    last, c = chat.last, chat.cache
    rate = last["new_tokens"] / last["generate_s"] if last["generate_s"] else 0.0
    return (f"prompt {last['prompt_tokens']} tokens in {last['prompt_s']:.2f} s; generated {last['new_tokens']} "
            f"tokens in {last['generate_s']:.2f} s ({rate:.1f} tokens/s); {s.describe_cache()}: "
            f"{c.get_seq_length()} tokens held ({c.nbytes() / 2**20:.1f} MiB), {c.evicted} evicted")
