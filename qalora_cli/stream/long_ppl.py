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
                 progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict[int, float]]:
    """dense / sinks / window: one token at a time on one cache. -> (summary, {position: nll})."""
    cache = make_cache(model, "full" if kind == "dense" else "sinks", 0 if kind == "window" else sinks,
                       sinks + window if kind == "window" else window)
    nll, times, peak_tokens, peak_bytes = {}, {}, 0, 0
    logits = feed(model, cache, ids[:1])
    for t in range(1, len(ids)):
        nll[t] = _nll(logits, ids[t])
        t0 = time.perf_counter()
        if t < len(ids) - 1:
            logits = feed(model, cache, [ids[t]])
        times[t] = time.perf_counter() - t0
        peak_tokens = max(peak_tokens, cache.get_seq_length())
        peak_bytes = max(peak_bytes, cache.nbytes())
        if progress and (t % 256 == 0 or t == len(ids) - 1):
            progress(t, len(ids) - 1)
    extra = {"peak_cache_tokens": peak_tokens, "peak_cache_bytes": peak_bytes, "evicted": cache.evicted,
             "sinks": 0 if kind in ("window", "dense") else sinks,
             "window": None if kind == "dense" else (sinks + window if kind == "window" else window)}
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
