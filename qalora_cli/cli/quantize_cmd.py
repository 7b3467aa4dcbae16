"""`qalora quantize`: GPTQ (or RTN) INT-n, group-wise, to a GPTQ-format checkpoint."""

from __future__ import annotations

from typing import Optional

import typer

from .common import CONFIG_HELP, build_config, overrides_arg, planned_only
from ..plan.cli_options import dry_run_option, output_json_option


def quantize(
    overrides: Optional[list[str]] = overrides_arg,
    config: str = typer.Option("smollm2-135m-int4", "--config", "-c", help=CONFIG_HELP),
    model: Optional[str] = typer.Option(None, help="Hugging Face folder, .gguf file or hub id"),
    bits: Optional[int] = typer.Option(None, help="2, 3, 4 or 8"),
    group_size: Optional[int] = typer.Option(None, help="columns per group, or -1 per-channel"),
    method: Optional[str] = typer.Option(None, help="gptq or rtn"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
    dry_run: bool = dry_run_option,
    output_json: bool = output_json_option,
    resume: bool = typer.Option(False, "--resume", help="continue after the last block an interrupted run "
                                                        "saved in <output>.partial/"),
) -> None:
    """Quantize a causal LM with GPTQ and write a GPTQ-format checkpoint plus a JSON report."""
    flags = {"model.name_or_path": model, "quantize.bits": bits, "quantize.group_size": group_size,
             "quantize.method": method, "quantize.device": device, "output.dir": output,
             "output.overwrite": overwrite or None}
    # --model names the model outright: drop the config's package and GGUF file name.
    model_reset = ["model.package=null", "model.gguf_file=null"] if model is not None else []
    cfg = build_config(config, model_reset + list(overrides or []), flags)
    if planned_only("quantize", cfg, dry_run, output_json):
        return
    from ..recipes.quantize import run

    report = run(cfg, resume=resume)
    _print_summary(report)


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    layers = report["layers"]
    worst = max(layers, key=lambda r: r["rel_output_error"])
    t = Table(title=f"{report['method'].upper()} INT{report['bits']} g{report['group_size']}: {report['model']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("layers quantized", str(len(layers)))
    t.add_row("mean relative output error", f"{report['mean_rel_output_error']:.4g}")
    t.add_row("worst layer", f"{worst['name']} ({worst['rel_output_error']:.4g})")
    t.add_row("calibration", f"{report['calibration']['num_samples']} x {report['calibration']['seq_len']} tokens")
    t.add_row("quantize time (s)", f"{report['seconds']['quantize']:.1f} on {report['device']}")
    t.add_row("total time (s)", f"{report['seconds']['total']:.1f}")
    t.add_row("output", report["output"])
    Console().print(t)
