"""The `--dry-run` and `--output-json` options the stage commands share."""

from __future__ import annotations

import typer

dry_run_option = typer.Option(False, "--dry-run", help="print the peak memory each device will need (the model "
                                                        "built from its config only, no weights read) and exit; "
                                                        "nothing is written")
output_json_option = typer.Option(False, "--output-json", help="with --dry-run: the plan as JSON on stdout")
