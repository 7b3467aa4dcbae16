"""A key/value cache that keeps the first `sinks` tokens and the last `window` ones
(StreamingLLM, Xiao et al. 2024), for transformers 5.x models with rotary positions.

Positions are assigned within the cache, as the paper requires: a token's key is rotated for
its place in the cache, not in the text. transformers applies RoPE before the cache sees a
key, so on eviction the surviving window keys are rotated back by the number of tokens
evicted (a rotation by -d steps composes exactly with the one by p steps they carry, and a
scalar attention scaling commutes with it). The caller evicts *before* each forward
(`make_room`) and passes position_ids = arange(len, len + n): to the model the cache is an
ordinary dynamic cache of the kept tokens, so masks and attention are the library's own, and
until the cache is full nothing differs from the plain cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from ..errors import UserError

# rope types whose frequencies do not depend on the sequence length: a fixed rotation per step
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(model) -> torch.Tensor:
    """The per-pair rotation frequencies of the model's rotary embedding, or a one-line refusal
    for models where re-rotating cached keys would not be exact."""
    config = model.config.get_text_config(decoder=True)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UserError(f"{type(model).__name__}: no rotary position embedding found; attention sinks need RoPE "
                        "(use --cache full)")
    if rope not in STATIC_ROPE:
        raise UserError(f"rope type {rope!r} changes its frequencies with the sequence length, so cached keys "
                        f"cannot be moved exactly; attention sinks support {', '.join(STATIC_ROPE)} (use --cache full)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise UserError("partial rotary embeddings are not supported with attention sinks (use --cache full)")
    return rotary.inv_freq.detach().float()


def rotate_keys(keys: torch.Tensor, steps: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [..., tokens, head_dim] already rotated for positions p, rotated for p + steps
    (transformers' rotate_half layout: pairs (i, i + head_dim/2)), computed in float32 at least."""
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    angle = steps * inv_freq.to(keys.device, work)
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    k = keys.to(work)
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


class SinkCache(DynamicCache):
    """The first `sinks` tokens plus the latest `window`; `make_room(n)` before each forward."""

    def __init__(self, model, sinks: int, window: int):
        if sinks < 0 or window < 1:
            raise UserError(f"--sinks must be 0 or more and --window at least 1 (got {sinks}, {window})")
        super().__init__(config=model.config)
        self.sinks, self.window = sinks, window
        self.inv_freq = rope_inv_freq(model)
        self.evicted = 0  # tokens dropped for good, over the cache's life

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def make_room(self, incoming: int) -> int:
        """Evict the oldest non-sink tokens so that `incoming` more fit; -> how many. A chunk
        longer than the window cannot fit beside the sinks: the caller splits it."""
        if incoming > self.window:
            raise ValueError(f"a chunk of {incoming} tokens exceeds the window of {self.window}")
        length = self.get_seq_length()
        drop = max(0, length + incoming - self.capacity)
        if drop == 0:
            return 0
        for layer in self.layers:
            keep_k, keep_v = layer.keys[..., self.sinks + drop:, :], layer.values[..., self.sinks + drop:, :]
            layer.keys = torch.cat([layer.keys[..., :self.sinks, :], rotate_keys(keep_k, -drop, self.inv_freq)], dim=-2)
            layer.values = torch.cat([layer.values[..., :self.sinks, :], keep_v], dim=-2)
        self.evicted += drop
        return drop

    def nbytes(self) -> int:
        return cache_nbytes(self)


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes the cache's keys and values hold now."""
    return sum(t.numel() * t.element_size() for layer in cache.layers if layer.is_initialized
               for t in (layer.keys, layer.values))
