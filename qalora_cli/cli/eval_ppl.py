"""`qalora eval ppl`: perplexity by sliding window, on any model kind `qalora eval` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..library_logs import quiet_library_logs
from .model_options import adapter_option, device_option, dtype_option, kernel_option, model_option
from .eval_cmd import eval_app


@eval_app.command("ppl")
def ppl_cmd(
    model: Optional[str] = model_option,
    adapter: Optional[Path] = adapter_option,
    text: str = typer.Option("builtin", help="builtin (held-out text, never calibration text), a .txt/.json/"
                                             ".jsonl/.csv/.parquet file, or a hub dataset id"),
    text_config: Optional[str] = typer.Option(None, help="the hub dataset's configuration, e.g. wikitext-2-raw-v1"),
    split: str = typer.Option("test", help="the hub dataset's split"),
    text_field: str = typer.Option("text", help="the field holding the text (datasets and tabular files)"),
    seq_len: int = typer.Option(512, help="tokens per window"),
    stride: Optional[int] = typer.Option(None, help="tokens between window starts (default: seq-len, disjoint "
                                                    "windows); smaller gives each token more context"),
    max_tokens: Optional[int] = typer.Option(None, help="score only the first N tokens of the text"),
    batch_size: int = typer.Option(4, help="windows per forward pass"),
    device: str = device_option,
    dtype: str = dtype_option,
    kernel: str = kernel_option,
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the result to this JSON file"),
) -> None:
    """Perplexity of held-out text by sliding window (each token scored once)."""
    from ..recipes.evaluate import run_perplexity

    quiet_library_logs()
    r = run_perplexity(model, adapter, text=text, text_config=text_config, split=split, text_field=text_field,
                       seq_len=seq_len, stride=stride, max_tokens=max_tokens, batch_size=batch_size, device=device,
                       dtype=dtype, kernel=kernel, output_json=output_json)
    typer.echo(f"perplexity {r['ppl']:.4f} over {r['tokens']} tokens of {r['text']} (window {r['seq_len']}, "
               f"stride {r['stride']}); {r['model']}; {r['seconds']:.1f} s")
