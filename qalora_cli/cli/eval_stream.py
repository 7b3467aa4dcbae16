"""`qalora eval stream`: perplexity of a long text read one token at a time, under dense,
window, sink or re-computed attention (StreamingLLM's evaluation), with perplexity and speed
by position, the cache held, JSON and a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..library_logs import quiet_library_logs
from .model_options import adapter_option, device_option, dtype_option, kernel_option, model_option
from .eval_cmd import eval_app


@eval_app.command("stream")
def stream_cmd(
    model: Optional[str] = model_option,
    adapter: Optional[Path] = adapter_option,
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
    device: str = device_option,
    dtype: str = dtype_option,
    kernel: str = kernel_option,
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the results to this JSON file"),
    plot: Optional[Path] = typer.Option(None, help="write a PNG of perplexity against position"),
    per_token: bool = typer.Option(False, "--per-token", help="also write each scored token's loss (nll) and "
                                                              "position to the JSON"),
) -> None:
    """Perplexity of a long text read token by token, by position, under each attention. (Dense
    reads 256 tokens per forward: with nothing evicted, causal attention gives each token what
    reading one at a time would, without copying a cache of thousands of tokens per token.)"""
    from ..recipes.evaluate import run_stream

    quiet_library_logs()
    report = run_stream(model, adapter, text=text, text_config=text_config, split=split, text_field=text_field,
                        attention=attention, sinks=sinks, window=window, max_tokens=max_tokens,
                        recompute_every=recompute_every, chunk_tokens=chunk_tokens, device=device, dtype=dtype,
                        kernel=kernel, output_json=output_json, plot=plot, per_token=per_token)
    print_stream(report)


def print_stream(report: dict) -> None:
    for kind, r in report["variants"].items():
        same = r.get("ppl_on_recompute_positions")
        extra = f", {same:.3f} on recompute's positions" if same is not None and kind != "recompute" else ""
        cache = f"peak cache {r['peak_cache_tokens']} tokens" + (
            f" ({r['peak_cache_bytes'] / 2**20:.1f} MiB)" if r.get("peak_cache_bytes") else "")
        typer.echo(f"{kind:9s} perplexity {r['ppl']:.3f} over {r['tokens']} tokens{extra}; {cache}; "
                   f"{r['tokens_per_s'] or 0:.1f} tokens/s")
    print(f"{report['model']}; {report['text']}, {report['text_tokens']} tokens", file=sys.stderr)
