"""``moekit demo``: the packaged demo recipe, run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.cli import app, user_errors


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the moekit package (moekit/recipes/NAME.yaml)."""
    return Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"


@app.command("demo")
@user_errors
def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Work directory (default: demo-out, or demo-tiny-out with --tiny)."),
    tiny: bool = typer.Option(False, "--tiny", help="A seconds-long version on a random tiny model (for tests)."),
    force: bool = typer.Option(False, "--force", help="Delete the work directory first and start from scratch."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Recipe overrides, e.g. train.max_steps=50."),
) -> None:
    """Run BTX end to end on a laptop CPU with no downloads (about 15 minutes; --tiny: seconds).

    Pretrains a small seed on Python stdlib code, pydoc's English reference text and generated arithmetic, branches it into those domains, trains each branch, mixes them with the seed as a generalist expert, tunes the MoE, then compares every model and shows the routing. Re-running skips finished stages.
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.recipe import load_recipe
    from moekit.report import render_run_outcome
    from moekit.steps.run import clear_workdir, run_recipe

    quiet_transformers()
    name = "demo-tiny" if tiny else "demo"
    workdir = (out or Path(f"{name}-out")).absolute()
    if force:
        clear_workdir(workdir)
    recipe = load_recipe(packaged_recipe(name), [f"workdir={workdir}", *(overrides or [])])
    console = Console()
    console.print(f"moekit demo ({name}): work directory {workdir}")
    render_run_outcome(console, run_recipe(recipe, log=console.print))
