"""``moekit run`` and ``moekit validate``."""

from __future__ import annotations

from pathlib import Path

import typer


def validate_command(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML file."),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides by dotted path, e.g. train.max_steps=200."
    ),
) -> None:
    """Check a recipe (keys, values, data paths) without running anything."""
    from rich.console import Console

    from moekit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    Console().print(
        f"[green]{recipe} is valid[/]: recipe '{loaded.name}', domains {', '.join(loaded.domains)}, stages "
        f"{', '.join(loaded.stages)}; workdir {loaded.workdir}"
    )


def run_command(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML file (see recipes/)."),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides by dotted path, e.g. train.max_steps=200 workdir=out."
    ),
) -> None:
    """Run a recipe: seed -> branch -> train -> mix -> average -> tune -> eval -> inspect.

    Finished stages whose inputs and options are unchanged are skipped; an interrupted train or tune resumes from
    its last checkpoint.
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.recipe import load_recipe
    from moekit.report.tables import render_run_outcome
    from moekit.steps.run import run_recipe

    quiet_transformers()
    console = Console()
    outcome = run_recipe(load_recipe(recipe, overrides or []), log=console.print)
    render_run_outcome(console, outcome)
