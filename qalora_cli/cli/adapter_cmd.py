"""`qalora adapter`: convert adapters to and from PEFT's QA-LoRA format."""

from __future__ import annotations

from pathlib import Path

import typer

adapter_app = typer.Typer(help="Convert adapters to and from PEFT's QA-LoRA format.", no_args_is_help=True)


@adapter_app.command("export-peft")
def export_peft_cmd(
    adapter: Path = typer.Option(..., help="a qalora adapter folder"),
    model: Path = typer.Option(..., help="the quantized checkpoint it was trained on"),
    output: Path = typer.Option(..., "--output", "-o", help="the PEFT adapter folder to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
) -> None:
    """Write a PEFT adapter (use_qalora) that computes what the qalora adapter computes."""
    from ..lora.adapter_io import check_base, read_adapter
    from ..lora.peft_format import export_peft
    from ..output_dir import atomic_output_dir

    config, _ = read_adapter(adapter)
    check_base(config, model)
    with atomic_output_dir(output, overwrite) as tmp:
        pc = export_peft(adapter, model, tmp)
    typer.echo(f"PEFT adapter: {output} (r {pc['r']}, qalora_group_size {pc['qalora_group_size']}, "
               f"{len(pc['target_modules'])} layers)")


@adapter_app.command("import-peft")
def import_peft_cmd(
    peft: Path = typer.Option(..., help="a PEFT LoRA adapter folder with use_qalora"),
    model: Path = typer.Option(..., help="the quantized checkpoint it belongs to"),
    output: Path = typer.Option(..., "--output", "-o", help="the qalora adapter folder to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output"),
) -> None:
    """Write a qalora adapter (mergeable with `qalora merge`) from a PEFT QA-LoRA adapter."""
    from ..lora.peft_format import import_peft
    from ..output_dir import atomic_output_dir

    with atomic_output_dir(output, overwrite) as tmp:
        config = import_peft(peft, model, tmp)
    typer.echo(f"qalora adapter: {output} (rank {config['rank']}, group {config['group_size']}, "
               f"{len(config['targets'])} layers)")
