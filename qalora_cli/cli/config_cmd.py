"""`qalora config ls|cp|show`: the built-in run configs, found by name."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import CONFIG_HELP, build_config, overrides_arg

config_app = typer.Typer(help="List, copy and show run configs.", no_args_is_help=True)


@config_app.command("ls")
def ls() -> None:
    """List the built-in configs with what each is for."""
    from ..config.loader import builtin_dir, builtin_names
    from ..shipped import first_comment_line

    for name in builtin_names():
        typer.echo(f"{name:22s} {first_comment_line(builtin_dir() / f'{name}.yaml')}")


@config_app.command("cp")
def cp(name: str = typer.Argument(..., help="built-in config name"),
       dest: Path = typer.Argument(..., help="file or folder to copy it to"),
       overwrite: bool = typer.Option(False, "--overwrite")) -> None:
    """Copy a built-in config to edit it (then pass the file to --config)."""
    from ..config.loader import builtin_dir, find_config

    src = find_config(name)
    if src.parent != builtin_dir():
        raise UserError(f"'{name}' is not a built-in config; `qalora config ls` lists them")
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not overwrite:
        raise UserError(f"'{target}' already exists; pass --overwrite to replace it")
    if not target.parent.is_dir():
        raise UserError(f"folder '{target.parent}' does not exist")
    shutil.copyfile(src, target)
    typer.echo(f"copied {name} to {target}")


@config_app.command("show")
def show(overrides: Optional[list[str]] = overrides_arg,
         config: str = typer.Option("smollm2-135m-int4", "--config", "-c", help=CONFIG_HELP)) -> None:
    """Validate a config with its overrides and print it in full, defaults included."""
    import yaml

    cfg = build_config(config, overrides, {})
    typer.echo(yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip())
