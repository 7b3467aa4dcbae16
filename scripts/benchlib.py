"""What the benchmark scripts share. Kept free of heavy imports (torch, transformers): some
scripts measure the memory and time their own imports take."""

from __future__ import annotations


def error_line(e: BaseException, limit: int | None = None) -> str:
    """'TypeName: the first line of the message' (at most `limit` characters of it), for a
    result file or a table cell that records why a variant failed."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:limit]}"


def mlx_greedy_answer(model, tok, prompt: str, stops: set[int], adds_bos: bool, max_tokens: int) -> str:
    """An answer as mlx-lm decodes it (generate_step: its KV cache, argmax), up to a stop token;
    the prompt tokenized as qalora's own exact-match scoring does (BOS when the tokenizer adds one)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from qalora_cli.data.instruct import bos_prefix

    ids = bos_prefix(tok, prompt, adds_bos) + tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        if int(t) in stops:
            break
        out.append(int(t))
    return tok.decode(out, skip_special_tokens=True).strip()
