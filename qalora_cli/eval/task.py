"""The fine-tuning task, held out: exact match of greedy answers and the answer loss (mean
cross-entropy over the response tokens) on the records a run config's data section holds out.
The same records and rendering as `qalora finetune` uses, so a model scored here is scored as
the fine-tune's own before/after report scores it."""

from __future__ import annotations

import torch

from ..config.schema import DataSection
from ..data.instruct import Example, collate, prompt_and_reference
from .exact_match import exact_match, generate_responses


def task_pairs(records: list[dict], data: DataSection, tokenizer) -> list[tuple[str, str]]:
    """-> [(prompt, reference)]: what the model is given, and the answer it should give."""
    return [prompt_and_reference(r, data.format, data.template, tokenizer) for r in records]


@torch.no_grad()
def answer_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over the response tokens of the examples (token-weighted, as the
    fine-tune's held-out loss): the label at position t is predicted from the tokens before it."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id)
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        logits, labels = logits[:, :-1].float(), b["labels"][:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        n += int((labels != -100).sum())
    return total / n


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def score_task(model, tokenizer, pairs: list[tuple[str, str]], examples: list[Example],
               max_new_tokens: int) -> dict:
    """-> {exact_match (None without pairs), answer_loss, examples, loss_examples, answers}."""
    answers = generate_responses(model, tokenizer, [p for p, _ in pairs], max_new_tokens) if pairs else []
    return {"exact_match": exact_match(answers, [r for _, r in pairs]) if pairs else None,
            "answer_loss": answer_loss(model, examples, pad_id_of(tokenizer)),
            "examples": len(pairs), "loss_examples": len(examples), "answers": answers}
