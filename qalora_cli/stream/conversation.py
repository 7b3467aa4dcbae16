"""A conversation on one cache: each turn feeds only the text it adds, so a long chat costs
what its new tokens cost, and with the sink cache older turns are evicted while the sinks
stay. `generate` is a conversation of one turn."""

from __future__ import annotations

import time
from typing import Iterator

from ..data.instruct import adds_bos, bos_prefix
from ..errors import UserError, first_line
from .decode import Sampling, TextStream, generate_tokens


class Conversation:
    def __init__(self, model, tokenizer, new_cache, sampling: Sampling, max_new_tokens: int,
                 template: bool, stop_ids: set[int], system: str | None = None):
        if template and not getattr(tokenizer, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template; use --raw to give it plain text")
        if system and not template:
            raise UserError("--system needs the model's chat template; drop --raw")
        self.system = system
        self.model, self.tokenizer, self.new_cache = model, tokenizer, new_cache
        self.sampling, self.max_new_tokens, self.template = sampling, max_new_tokens, template
        self.stop_ids = stop_ids
        self.adds_bos = adds_bos(tokenizer)
        self.reset()

    def reset(self) -> None:
        self.cache = self.new_cache()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.last = {"prompt_tokens": 0, "new_tokens": 0, "prompt_s": 0.0, "generate_s": 0.0}
        self.fed = ""        # the text the cache has read, as the template renders it
        self.tokens_read = 0  # over the conversation, evicted ones included

    def _new_ids(self, user: str) -> list[int]:
        """The tokens this turn adds: the template's rendering minus what was fed before (all of
        it again, on a fresh cache, if the template rewrites earlier turns)."""
        full = self._render(self.messages + [{"role": "user", "content": user}]) if self.template else self.fed + user
        if self.cache is None or not full.startswith(self.fed):
            self.cache, self.fed = self.new_cache(), ""
        text, fresh, self.fed = full[len(self.fed):], self.fed == "", full
        start = bos_prefix(self.tokenizer, text, self.adds_bos) if fresh else []
        return start + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise UserError(f"the model's chat template failed: {first_line(e)}") from e

    def reply(self, user: str) -> Iterator[str]:
        """Stream the answer to `user` as text pieces. The turn is recorded even when the caller
        stops early (Ctrl-C): the conversation keeps the answer so far."""
        ids = self._new_ids(user)
        self.tokens_read += len(ids)
        stream, answer, finished = TextStream(self.tokenizer), [], False
        t0 = first = time.perf_counter()
        try:
            for token in generate_tokens(self.model, self.cache, ids, self.max_new_tokens, self.sampling,
                                         self.stop_ids):
                if not answer:
                    first = time.perf_counter()
                answer.append(token)
                piece = stream.push(token)
                if piece:
                    yield piece
            tail = stream.flush()
            if tail:
                yield tail
            finished = True
        finally:
            if not finished:  # stopped mid-reply (Ctrl-C): the cache may hold part of a step, so it
                self.cache = None  # is rebuilt from the conversation's text at the next turn
            self.tokens_read += len(answer)
            end = time.perf_counter()
            self.last = {"prompt_tokens": len(ids), "new_tokens": len(answer),
                         "prompt_s": (first if answer else end) - t0, "generate_s": end - first if answer else 0.0}
            text = self.tokenizer.decode(answer, skip_special_tokens=True)
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
            self.fed += text
