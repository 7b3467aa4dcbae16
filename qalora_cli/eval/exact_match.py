"""Exact-match accuracy on held-out instruction records: greedy answers compared, after
stripping whitespace, with the reference responses."""

from __future__ import annotations

import torch

from ..data.instruct import adds_bos, bos_prefix

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3): a chat model
# ends its answer with one of these, which is not always its EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS, the model's own stop tokens (generation_config), and any end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    return sorted({i for i in ids if i is not None})


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                       device=None) -> list[str]:
    """Greedy answers to the prompts (the prompt itself left out, special tokens skipped, stripped)."""
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0] if stops else 0
    # Prompts are encoded as training encodes them (the same BOS rule), not by tokenizer(prompts).
    adds = adds_bos(tokenizer)
    encoded = [bos_prefix(tokenizer, p, adds) + tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts]
    # A fresh config: greedy, whatever sampling defaults the model ships with.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=stops or None, use_cache=True)
    # Similar lengths together: less left padding per batch.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            # Left padding: every prompt ends at the same position, where generation starts.
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(encoded[i])
                input_ids[r, width - n:] = torch.tensor(encoded[i], dtype=torch.long)
                attention_mask[r, width - n:] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for r, i in enumerate(rows):
                answers[i] = tokenizer.decode(out[r, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The fraction of predictions equal to their reference after .strip(), in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("exact match of no predictions")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)
