"""Options shared by the stage commands: a config, flag overrides and `section.key=value`."""

from __future__ import annotations

from typing import Any

import typer

from ..library_logs import quiet_library_logs  # noqa: F401  (the stage commands import it from here)

CONFIG_HELP = "built-in config name (see `qalora config ls`) or a YAML file"
OVERRIDES_HELP = "overrides as section.key=value, e.g. quantize.damp_percent=0.05"

overrides_arg = typer.Argument(None, help=OVERRIDES_HELP, show_default=False)


def build_config(config: str, overrides: list[str] | None, flags: dict[str, Any]):
    """Load `config`, then apply flag values (those given), then explicit overrides."""
    from ..config.loader import load_config

    flag_overrides = [f"{key}={_yaml(value)}" for key, value in flags.items() if value is not None]
    return load_config(config, flag_overrides + list(overrides or []))


def _yaml(value: Any) -> str:
    import json

    # JSON is YAML: strings are quoted so a path like "1e5" or "on" stays a string.
    return json.dumps(value)


def planned_only(stage: str, cfg, dry_run: bool, output_json: bool) -> bool:
    """With --dry-run, print the stage's memory plan (qalora_cli/plan: configs read, no weights,
    nothing written) and say so; the stage command then returns."""
    quiet_library_logs()
    if not dry_run:
        return False
    from ..plan.dry_run import show_plan

    show_plan(stage, cfg, output_json)
    return True
