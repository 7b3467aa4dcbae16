"""The caches `generate`, `chat` and `eval stream` choose between, behind one interface:
`make_room(n)` before each forward (a no-op for the full cache), `nbytes()`, `capacity`."""

from __future__ import annotations

from transformers.cache_utils import DynamicCache

from ..errors import UserError
from .sink_cache import SinkCache, cache_nbytes

CACHE_KINDS = ("sinks", "full")


class FullCache(DynamicCache):
    """The plain cache: everything kept, memory grows with the text."""

    capacity = None
    evicted = 0

    def __init__(self, model):
        super().__init__(config=model.config)

    def make_room(self, incoming: int) -> int:
        return 0

    def nbytes(self) -> int:
        return cache_nbytes(self)


def make_cache(model, kind: str, sinks: int, window: int):
    if kind == "full":
        return FullCache(model)
    if kind == "sinks":
        return SinkCache(model, sinks, window)
    raise UserError(f"--cache {kind!r}: use one of {', '.join(CACHE_KINDS)}")
