"""`qalora eval stream`: perplexity of a long text read one token at a time, under dense,
window, sink or re-computed attention (StreamingLLM's evaluation), with perplexity and speed
by position, the cache held, JSON and a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..progress import rate_progress
from .eval_cmd import DTYPE_HELP, KERNEL_HELP, eval_app
from .generate_cmd import MODEL_HELP


def parse_attention(value: str, sinks: int, window: int) -> list[str]:
    from ..stream.long_ppl import ATTENTIONS

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


HEADLINE = ("ppl", "tokens", "tokens_per_s", "peak_cache_tokens", "peak_cache_bytes")


@eval_app.command("stream")
def stream_cmd(
    model: Optional[str] = typer.Option(None, help=MODEL_HELP),
    adapter: Optional[Path] = typer.Option(None, help="a qalora adapter folder, put on the GPTQ checkpoint --model"),
    text: str = typer.Option("builtin", help="builtin (held-out text), a .txt/.json/.jsonl/.csv/.parquet file, or a "
                                             "hub dataset id"),
    text_config: Optional[str] = typer.Option(None, help="the hub dataset's configuration"),
    split: str = typer.Option("test", help="the hub dataset's split"),
    text_field: str = typer.Option("text", help="the field holding the text (datasets and tabular files)"),
    attention: str = typer.Option("sinks", help="dense, sinks, window, recompute, or several comma-separated"),
    sinks: int = typer.Option(4, help="attention sinks (window attention: 0)"),
    window: int = typer.Option(1020, help="recent tokens beside the sinks; window and recompute attention keep "
                                          "sinks + window tokens"),
    max_tokens: Optional[int] = typer.Option(None, help="read only the first N tokens of the text"),
    recompute_every: int = typer.Option(64, help="recompute scores every k-th token only (its cost is a full "
                                                 "window per scored token)"),
    chunk_tokens: int = typer.Option(1024, help="positions per chunk in the by-position report and plot"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N, mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the results to this JSON file"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of perplexity against position"),
    per_token: bool = typer.Option(False, "--per-token", help="also write each scored token's loss (nll) and "
                                                              "position to the JSON"),
) -> None:
    """Perplexity of a long text read token by token, by position, under each attention. (Dense
    reads 256 tokens per forward: with nothing evicted, causal attention gives each token what
    reading one at a time would, without copying a cache of thousands of tokens per token.)"""
    kinds = parse_attention(attention, sinks, window)
    if max_tokens is not None and max_tokens < 2 or recompute_every < 1 or chunk_tokens < 1:
        raise UserError(f"--max-tokens must be at least 2, --recompute-every and --chunk-tokens positive (got "
                        f"{max_tokens}, {recompute_every}, {chunk_tokens})")
    if model is None and adapter is None:
        raise UserError("give --model (a GPTQ or merged checkpoint, a Hugging Face folder, a .gguf file or a hub id)")
    for path in (output_json, plot):
        if path is not None and path.parent and not path.parent.exists():
            raise UserError(f"'{path.parent}' does not exist: create it or write elsewhere")
    from ..eval.ppl_text import load_text

    body, desc = load_text(text, text_config, split, text_field)
    from .common import quiet_library_logs
    from .eval_cmd import load_eval_model

    quiet_library_logs()
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    ids = tokenizer(body, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} tokens: at least 2 are needed")
    report = {"model": name, "text": desc, "text_tokens": len(ids), "sinks": sinks, "window": window,
              "trained_context": getattr(loaded.config, "max_position_embeddings", None), "variants": {}}
    report["variants"] = run_variants(loaded, ids, kinds, sinks, window, recompute_every, chunk_tokens, per_token)
    first = report["variants"][kinds[0]]  # the headline figures: the first variant named
    report.update({"attention": kinds[0], **{k: first[k] for k in HEADLINE}})
    if output_json is not None:
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        from ..stream.plot import plot_by_position

        plot_by_position(report, plot)
    print_stream(report)


def run_variants(model, ids, kinds, sinks, window, every, chunk, per_token: bool = False) -> dict:
    from ..stream.long_ppl import restricted_ppl, score_cached, score_recompute

    results, nlls = {}, {}
    for kind in kinds:
        with rate_progress(f"{kind} attention", "tokens" if kind != "recompute" else "windows") as advance:
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


def print_stream(report: dict) -> None:
    for kind, r in report["variants"].items():
        same = r.get("ppl_on_recompute_positions")
        extra = f", {same:.3f} on recompute's positions" if same is not None and kind != "recompute" else ""
        cache = f"peak cache {r['peak_cache_tokens']} tokens" + (
            f" ({r['peak_cache_bytes'] / 2**20:.1f} MiB)" if r.get("peak_cache_bytes") else "")
        typer.echo(f"{kind:9s} perplexity {r['ppl']:.3f} over {r['tokens']} tokens{extra}; {cache}; "
                   f"{r['tokens_per_s'] or 0:.1f} tokens/s")
    print(f"{report['model']}; {report['text']}, {report['text_tokens']} tokens", file=sys.stderr)
