"""Perplexity by sliding window: each token is scored once, with up to `seq_len - stride`
tokens of context carried over from the previous window (stride = seq_len: disjoint windows).
Windows of equal length are scored in batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position inside the window) for a stream of n tokens."""
    out, prev_end = [], 0
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n)
        out.append((begin, end, max(prev_end, begin + 1) - begin))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4) -> dict:
    """-> {"ppl", "nll", "tokens"} over a 1-D token stream."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise UserError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    ids = input_ids.flatten()
    if max_tokens:
        ids = ids[:max_tokens]
    if ids.numel() < seq_len + 1:
        raise UserError(f"the text has {ids.numel()} tokens, shorter than one window of {seq_len} + 1")
    device = next(model.parameters()).device
    windows = _windows(ids.numel(), seq_len, stride)
    nll_sum, counted = 0.0, 0
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        batch = [windows[i]]
        while (i + len(batch) < len(windows) and len(batch) < batch_size
               and windows[i + len(batch)][1] - windows[i + len(batch)][0] == length):
            batch.append(windows[i + len(batch)])
        i += len(batch)
        x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
        logits = model(input_ids=x).logits
        for row, (_, _, first) in enumerate(batch):
            targets = x[row, first:]
            nll_sum += F.cross_entropy(logits[row, first - 1:-1].float(), targets, reduction="sum").item()
            counted += targets.numel()
    nll = nll_sum / counted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": counted}
