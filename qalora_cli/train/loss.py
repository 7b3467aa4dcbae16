"""The training objective as a module, so DDP wraps one forward that returns the loss.

Cross-entropy is summed over the response tokens only and divided by the whole step's
response-token count (over accumulation and processes), so every token weighs the same and
2 processes x 2 micro-batches give the same gradient as 1 process x 4. The output layer runs
only at the labelled positions: prompts are often longer than responses, and the vocabulary
projection is a fifth of a small model's compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResponseLoss(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        cfg = lm.config
        # Models that rescale or cap their logits need the full forward to get them right.
        self.full_forward = any(getattr(cfg, k, None) not in (None, 1.0) for k in
                                ("final_logit_softcapping", "logit_scale", "logits_scaling"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                denominator: float) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != -100
        if self.full_forward:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, :-1][keep]
        else:
            hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / denominator
