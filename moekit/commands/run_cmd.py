"""``moekit run`` and ``moekit validate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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
    launcher: Optional[str] = typer.Option(
        None,
        "--launcher",
        help="Where the stages run: inline (this process, one after another), local (independent stages as "
        "concurrent processes here), slurm (one Slurm job per stage). Default: the recipe's launcher.kind (inline).",
    ),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="slurm: submit the jobs and return (follow them with moekit status)."
    ),
    only: Optional[str] = typer.Option(
        None,
        "--only",
        metavar="STAGE",
        help="Run this one stage here (e.g. train:code; the stages it needs must be done). Launchers' jobs run this.",
    ),
    status: bool = typer.Option(False, "--status", help="Show each stage's state, job and progress; run nothing."),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel the run's jobs that are pending or running."),
) -> None:
    """Run a recipe: seed -> branch -> train -> mix -> average -> tune -> dense, upcycle -> eval -> inspect.

    Finished stages whose inputs and options are unchanged are skipped; an interrupted train or tune resumes from
    its last checkpoint. With --launcher local or slurm (or the recipe's launcher section), the branches train at
    the same time as separate jobs, each stage starting when the stages it needs are done; a failed job stops only
    what needs it, and running the recipe again starts only what is unfinished.

    \b
    Examples:
      moekit run my-btx.yaml
      moekit run my-btx.yaml --launcher slurm --no-wait
      moekit run my-btx.yaml --status
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.recipe import load_recipe

    settings = list(overrides or [])
    if launcher is not None:
        settings.append(f"launcher.kind={launcher}")
    if no_wait:
        settings.append("launcher.wait=false")
    loaded = load_recipe(recipe, settings)
    console = Console()
    if status or cancel:
        show_status(loaded.workdir, cancel, console)
        return
    quiet_transformers()
    if only is not None:
        from moekit.steps.run import run_one_stage

        run_one_stage(loaded, only, show_progress=True, log=console.print)
    elif loaded.launcher.kind == "inline":
        from moekit.report.tables import render_run_outcome
        from moekit.steps.run import run_recipe

        render_run_outcome(console, run_recipe(loaded, log=console.print))
    else:
        _launch(loaded, console)


def _launch(recipe: Any, console: Any) -> None:
    from moekit.report.tables import render_launch_outcome
    from moekit.steps.run import launch_recipe

    outcome = launch_recipe(recipe, log=console.print)
    render_launch_outcome(console, outcome)
    if outcome.waited and not outcome.finished:
        raise typer.Exit(1)


def show_status(path: Path, cancel: bool, console: Any) -> None:
    """Print the run's status table (after cancelling its live jobs with ``cancel``)."""
    from moekit.report.tables import render_run_status
    from moekit.steps.run import cancel_run, run_status

    if cancel:
        stopped = cancel_run(path)
        console.print(f"cancelled: {', '.join(stopped)}" if stopped else "no job of this run was pending or running")
    render_run_status(console, run_status(path))
