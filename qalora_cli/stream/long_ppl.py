"""Perplexity of a long text read one token at a time, as StreamingLLM's eval_long_ppl does,
under four attention schemes:
  - dense: the full cache (memory grows; past the trained context RoPE is out of range);
  - sinks: the sink cache, `sinks` + `window`;
  - window: the same cache without sinks, 0 + (sinks + window): equal memory;
  - recompute: the last sinks + window tokens re-run from scratch for each scored token (the
    quality reference, quadratic in cost), scored every `every`-th token only.
Every variant reports perplexity by position chunk, tokens/s by chunk and the cache it held."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from ..errors import UserError
from .caches import make_cache
from .decode import feed

ATTENTIONS = ("dense", "sinks", "window", "recompute")


def _summary(nll: dict[int, float], times: dict[int, float], chunk: int, extra: dict) -> dict:
    """Per-chunk perplexity and speed over the scored positions."""
    chunks = []
    for start in range(0, max(nll) + 1, chunk):
        pos = [p for p in nll if start <= p < start + chunk]
        if pos:
            secs = sum(times.get(p, 0.0) for p in pos)
            chunks.append({"start": start, "end": start + chunk, "scored": len(pos),
                           "ppl": math.exp(sum(nll[p] for p in pos) / len(pos)),
                           "tokens_per_s": len(pos) / secs if secs else None})
    total_s = sum(times.values())
    return {"ppl": math.exp(sum(nll.values()) / len(nll)), "tokens": len(nll),
            "tokens_per_s": len(nll) / total_s if total_s else None, "seconds": round(total_s, 2),
            "chunks": chunks, **extra}


def _nll(logits: torch.Tensor, target: int) -> float:
    return float(-torch.log_softmax(logits.float(), -1)[target])


@torch.inference_mode()
def score_cached(model, ids: list[int], kind: str, sinks: int, window: int, chunk: int,
                 progress: Callable[[int, int], None] | None = None, dense_chunk: int = 256) -> tuple[dict, dict[int, float]]:
    """dense / sinks / window on one cache. -> (summary, {position: nll}). Sinks and window read
    one token at a time (eviction happens between tokens). Dense reads `dense_chunk` tokens per
    forward: with nothing evicted, causal attention gives each token exactly what reading one
    at a time would, without re-copying a cache of thousands of tokens for every token."""
    cache = make_cache(model, "full" if kind == "dense" else "sinks", 0 if kind == "window" else sinks,
                       sinks + window if kind == "window" else window)
    step = dense_chunk if kind == "dense" else 1
    nll, times, peak_tokens, peak_bytes = {}, {}, 0, 0
    for start in range(0, len(ids) - 1, step):
        part = ids[start:min(start + step, len(ids) - 1)]
        t0 = time.perf_counter()
        logits = feed(model, cache, part, chunk=step, all_logits=True)
        dt = (time.perf_counter() - t0) / len(part)
        for i in range(len(part)):
            nll[start + i + 1] = _nll(logits[i], ids[start + i + 1])
            times[start + i + 1] = dt
        peak_tokens = max(peak_tokens, cache.get_seq_length())
        peak_bytes = max(peak_bytes, cache.nbytes())
        if progress and ((start // step) % max(1, 256 // step) == 0 or start + step >= len(ids) - 1):
            progress(min(start + step, len(ids) - 1), len(ids) - 1)
    extra = {"peak_cache_tokens": peak_tokens, "peak_cache_bytes": peak_bytes, "evicted": cache.evicted,
             "sinks": 0 if kind in ("window", "dense") else sinks,
             "window": None if kind == "dense" else (sinks + window if kind == "window" else window),
             "tokens_per_forward": step}
    return _summary(nll, times, chunk, extra), nll


@torch.inference_mode()
def score_recompute(model, ids: list[int], context: int, every: int, chunk: int, batch: int = 4,
                    progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict[int, float]]:
    """Each scored token t sees ids[t - context : t], run from scratch at positions 0.. (the
    same positions the sink cache gives its window)."""
    device = next(model.parameters()).device
    positions = list(range(every, len(ids), every))
    if not positions:
        raise UserError(f"recompute scores every {every}th token and the text has {len(ids)}: lower "
                        "--recompute-every")
    nll, times = {}, {}
    for i in range(0, len(positions), batch):
        group = positions[i:i + batch]
        t0 = time.perf_counter()
        rows = [ids[max(0, t - context):t] for t in group]
        if len({len(r) for r in rows}) == 1:  # one forward for equal lengths (past the first window)
            logits = model(input_ids=torch.tensor(rows, device=device), logits_to_keep=1).logits[:, -1]
        else:
            logits = torch.cat([model(input_ids=torch.tensor([r], device=device), logits_to_keep=1).logits[:, -1]
                                for r in rows])
        for t, row in zip(group, logits):
            nll[t] = _nll(row, ids[t])
        dt = (time.perf_counter() - t0) / len(group)
        times.update({t: dt for t in group})
        if progress:
            progress(min(i + batch, len(positions)), len(positions))
    extra = {"peak_cache_tokens": context, "peak_cache_bytes": None, "evicted": None, "every": every,
             "context": context}
    return _summary(nll, times, chunk, extra), nll


def restricted_ppl(nll: dict[int, float], positions) -> float | None:
    """Perplexity over the given positions only (to compare with recompute's sparse scoring)."""
    vals = [nll[p] for p in positions if p in nll]
    return math.exp(sum(vals) / len(vals)) if vals else None
