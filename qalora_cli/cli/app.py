"""The `qalora` command. One error boundary for every subcommand: a UserError prints one
line and exits 2 (set QALORA_DEBUG=1 for the traceback). Nothing heavy is imported here, so
`qalora --help` answers at once."""

from __future__ import annotations

import os

import typer
from typer.core import TyperGroup

from ..errors import UserError


class _BoundaryGroup(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if os.environ.get("QALORA_DEBUG"):
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Exception as e:
            from ..output_dir import is_disk_full

            if os.environ.get("QALORA_DEBUG") or not is_disk_full(e):
                raise
            where = f" writing '{e.filename}'" if isinstance(e, OSError) and e.filename else ""
            typer.echo(f"error: no space left on the device{where}: free some space or choose another location",
                       err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_BoundaryGroup,
    help="Quantize (GPTQ), fine-tune (QA-LoRA), merge exactly, export and evaluate causal LMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from . import (adapter_cmd, config_cmd, eval_cmd, eval_ppl, eval_stream, finetune_cmd, generate_cmd,  # noqa: E402,F401
               merge_cmd, quantize_cmd, recipe_cmd)

app.add_typer(config_cmd.config_app, name="config")
app.add_typer(adapter_cmd.adapter_app, name="adapter")
app.add_typer(eval_cmd.eval_app, name="eval")
app.add_typer(recipe_cmd.recipe_app, name="recipe")
app.command("quantize")(quantize_cmd.quantize)
app.command("finetune")(finetune_cmd.finetune)
app.command("merge")(merge_cmd.merge)
app.command("generate")(generate_cmd.generate)
app.command("chat")(generate_cmd.chat)


def main() -> None:
    app()
