"""`qalora finetune`: QA-LoRA adapters on the frozen quantized model, or the paper's baselines
(QLoRA: PEFT LoRA on the NF4 float model; LoRA on the 16-bit float model)."""

from __future__ import annotations

from typing import Optional

import typer

from .common import CONFIG_HELP, build_config, overrides_arg, planned_only
from ..plan.cli_options import dry_run_option, output_json_option


def finetune(
    overrides: Optional[list[str]] = overrides_arg,
    config: str = typer.Option("smollm2-135m-int4", "--config", "-c", help=CONFIG_HELP),
    method: Optional[str] = typer.Option(None, help="qalora (default), qlora (NF4 float model + PEFT LoRA) or lora "
                                                    "(16-bit float model + PEFT LoRA)"),
    model: Optional[str] = typer.Option(None, help="the quantized checkpoint (default: the config's output.dir)"),
    data: Optional[str] = typer.Option(None, help="'builtin', a .json/.jsonl/.csv/.parquet file or folder, "
                                                  "or a hub dataset id"),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="adapter folder (default: <output.dir>-<method>)"),
    max_steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="continue from the adapter folder's last checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing adapter folder"),
    dry_run: bool = dry_run_option,
    output_json: bool = output_json_option,
) -> None:
    """Train QA-LoRA adapters on a quantized checkpoint (or a baseline's); save them with their config."""
    flags = {"finetune.method": method, "train.quantized_model": model, "data.source": data,
             "train.adapter_dir": output, "train.max_steps": max_steps, "train.device": device}
    cfg = build_config(config, list(overrides or []), flags)
    if planned_only("finetune", cfg, dry_run, output_json):
        return
    from ..recipes.finetune import run

    report = run(cfg, resume=resume, overwrite=overwrite)
    _print_summary(report)


def _print_summary(report: dict) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report["interrupted"]:
        console.print(f"interrupted after step {report['steps']}; checkpoint saved in {report['adapter']}. "
                      "Continue with the same command and --resume.")
        return
    name = {"qalora": "QA-LoRA", "qlora": "QLoRA (NF4)", "lora": "LoRA (16-bit)"}[report.get("method", "qalora")]
    t = Table(title=f"{name} fine-tune: {report['steps']} steps on {report['device']} "
                    f"({report['processes']} process(es), {report['mixed_precision']})")
    t.add_column("held-out")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    b, a = report["before"], report["after"]
    t.add_row("loss", f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}")
    if b.get("generation") and a.get("generation"):
        t.add_row(f"exact match ({a['generation']['examples']} prompts)",
                  f"{100 * b['generation']['exact_match']:.1f}%", f"{100 * a['generation']['exact_match']:.1f}%")
    console.print(t)
    st = report["data_stats"]
    speed = f"{report['tokens_per_s']:.0f} tokens/s" if report.get("tokens_per_s") else "no training step"
    console.print(f"{report['train_examples']} training examples ({st['truncated']} truncated, {st['skipped']} "
                  f"skipped as longer than data.max_length); {speed}; "
                  f"train {report['seconds']['train']:.0f} s, total {report['seconds']['total']:.0f} s; "
                  f"peak memory {report['peak_memory_mib']:.0f} MiB")
    init = report.get("init") or {}
    if init.get("method") not in (None, "zero") and "mean_remaining_error" in init:
        console.print(f"lora.init {init['method']} ({init['stats']}, {init['seconds']:.1f} s): "
                      f"{100 * (1 - init['mean_remaining_error']):.1f}% of the layers' quantization output error "
                      f"cancelled on the calibration inputs (full-rank limit "
                      f"{100 * (1 - init['mean_full_rank_remaining_error']):.1f}%)")
    console.print(f"adapter: {report['adapter']}")
