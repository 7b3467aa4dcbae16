"""`qalora recipe ls|show|run`: whole experiments declared in YAML (recipes/), run as stages."""

from __future__ import annotations

from typing import Optional

import typer

recipe_app = typer.Typer(help="List, show and run recipes: whole experiments as stages over a sweep.",
                         no_args_is_help=True)
RECIPE_HELP = "a built-in recipe name (see `qalora recipe ls`) or a YAML file"


@recipe_app.command("ls")
def ls() -> None:
    """List the built-in recipes with what each is for."""
    from ..shipped import first_comment_line, shipped_dir, shipped_names

    for name in shipped_names("recipes"):
        typer.echo(f"{name:22s} {first_comment_line(shipped_dir('recipes') / f'{name}.yaml')}")


@recipe_app.command("show")
def show(recipe: str = typer.Argument(..., help=RECIPE_HELP),
         output: Optional[str] = typer.Option(None, "--output", "-o", help="the recipe's output folder")) -> None:
    """Check a recipe and print its stage runs with what `run` would do with each."""
    from ..pipeline.runner import describe_plan, load_recipe

    typer.echo("\n".join(describe_plan(load_recipe(recipe, output))))


@recipe_app.command("run")
def run(recipe: str = typer.Argument(..., help=RECIPE_HELP),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="the recipe's output folder"),
        dry_run: bool = typer.Option(False, "--dry-run", help="list what would run, run nothing")) -> None:
    """Run a recipe: every stage not finished with the same inputs, then the results."""
    from ..pipeline.runner import describe_plan, load_recipe, run_recipe

    loaded = load_recipe(recipe, output)
    if dry_run:
        typer.echo("\n".join(describe_plan(loaded)))
        return
    report = run_recipe(loaded, lambda line: typer.echo(line, err=True))
    typer.echo(f"{report['ran']} stage runs, {report['reused']} reused; results: {', '.join(report['files'])}")
