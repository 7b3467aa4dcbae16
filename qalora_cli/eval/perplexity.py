"""Perplexity by sliding window: each token is scored once, with up to `seq_len - stride`
tokens of context carried over from the previous window (stride = seq_len: disjoint windows)."""

from __future__ import annotations

import math

import torch

from ..errors import UserError


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int, stride: int | None = None,
               max_tokens: int | None = None) -> dict:
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
    nll_sum, counted, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + seq_len, ids.numel())
        window = ids[begin:end].to(device).unsqueeze(0)
        logits = model(input_ids=window).logits.float()
        # score only the tokens no earlier window scored
        first_new = max(prev_end, begin + 1) - begin
        targets = window[0, first_new:]
        logp = torch.log_softmax(logits[0, first_new - 1:-1], dim=-1)
        nll_sum -= logp.gather(1, targets.unsqueeze(1)).sum().item()
        counted += targets.numel()
        prev_end = end
        if end == ids.numel():
            break
    nll = nll_sum / counted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": counted}
