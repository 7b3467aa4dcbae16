"""`qalora eval ppl`: perplexity by sliding window, on any model kind `qalora eval` loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .eval_cmd import DTYPE_HELP, KERNEL_HELP, eval_app, load_eval_model


@eval_app.command("ppl")
def ppl_cmd(
    model: Optional[str] = typer.Option(None, help="a qalora GPTQ or merged checkpoint folder, a Hugging Face "
                                                   "folder, a .gguf file or a hub id (with --adapter: its base)"),
    adapter: Optional[Path] = typer.Option(None, help="a qalora adapter folder, put on the GPTQ checkpoint --model"),
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
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N, mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the result to this JSON file"),
) -> None:
    """Perplexity of held-out text by sliding window (each token scored once)."""
    from .common import quiet_library_logs

    if seq_len < 2 or batch_size < 1 or (stride is not None and not 0 < stride <= seq_len):
        raise UserError(f"--seq-len must be at least 2, --batch-size positive and --stride in 1..seq-len "
                        f"(got {seq_len}, {batch_size}, {stride})")
    if model is None and adapter is None:
        raise UserError("give --model (a GPTQ checkpoint, a Hugging Face folder, a .gguf file or a hub id)")
    from ..eval.ppl_text import load_text

    body, desc = load_text(text, text_config, split, text_field)  # a bad text fails before the model loads
    quiet_library_logs()
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    import time

    import torch

    from ..eval.perplexity import perplexity

    ids = torch.tensor(tokenizer(body, add_special_tokens=False)["input_ids"])
    t = time.perf_counter()
    result = perplexity(loaded, ids, seq_len, stride, max_tokens, batch_size)
    report = {"model": name, "text": desc, "seq_len": seq_len, "stride": stride or seq_len, **result,
              "seconds": round(time.perf_counter() - t, 2)}
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"perplexity {result['ppl']:.4f} over {result['tokens']} tokens of {desc} (window {seq_len}, "
               f"stride {stride or seq_len}); {name}; {report['seconds']:.1f} s")
