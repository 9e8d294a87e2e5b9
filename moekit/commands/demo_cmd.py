"""``moekit demo``: the packaged demo recipe, run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

# A prompt per demo domain for the generation samples (the tiny demo's domains have the same names).
# Prompts end at a word, not a space: a byte-level BPE attaches the space to the next word.
DEMO_PROMPTS = {"code": "import os\nimport sys\n\ndef", "prose": "The return statement",
                "math": "Ann has 12 pens and gets 30 more. How many pens does Ann have?"}


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the moekit package (moekit/recipes/NAME.yaml)."""
    return Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"


def demo_command(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Work directory (default: demo-out, or demo-tiny-out with --tiny)."),
    tiny: bool = typer.Option(False, "--tiny", help="A seconds-long version on a random tiny model (for tests)."),
    force: bool = typer.Option(False, "--force", help="Delete the work directory first and start from scratch."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Recipe overrides, e.g. train.max_steps=50."),
) -> None:
    """Run BTX end to end on a laptop CPU with no downloads (about 30 minutes; --tiny: seconds).

    Pretrains a small seed on Python stdlib code, pydoc's English reference text and generated arithmetic, branches it into those domains, trains each branch, mixes them with the seed as a generalist expert, tunes the MoE, builds the dense and upcycling baselines at equal compute, then compares every model, shows the routing, a generation per domain and the arithmetic accuracy (greedy and SCMoE), and writes an HTML report (RUN/report.html). Re-running skips finished stages.
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.recipe import load_recipe
    from moekit.report.tables import render_run_outcome
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
    show_generations(console, workdir / "run", problems=40 if tiny else 200)
    write_demo_report(console, workdir / "run")


def write_demo_report(console: Any, run_dir: Path) -> Path:
    """The run's HTML report (moekit report), with the demo's prompts for the generation samples."""
    from moekit.manifest import load_manifest
    from moekit.report.run_page import write_report
    from moekit.steps.report import gather_run

    prompts = {d: DEMO_PROMPTS[d] for d in load_manifest(run_dir).branches if d in DEMO_PROMPTS}
    path = write_report(gather_run(run_dir, prompts or None), run_dir / "report.html")
    console.print(f"[green]Report:[/] {path} (open it in a browser)", soft_wrap=True)  # a path must stay copyable
    return path


def show_generations(console: Any, run_dir: Path, problems: int) -> None:
    """The tuned MoE's continuation of a prompt per domain, coloured by expert, and the arithmetic accuracy of seed / tuned / tuned+SCMoE."""
    from moekit.config import EvalConfig, GenerateConfig
    from moekit.manifest import load_manifest
    from moekit.report.tables import render_generation_routing, render_task_table
    from moekit.steps.evaluate_task import evaluate_task
    from moekit.steps.generate import Generator

    tuned = run_dir / "tuned"
    if not (tuned / "config.json").is_file():
        return
    generator = Generator(GenerateConfig(model=str(tuned), raw=True, max_new_tokens=24))
    for domain in load_manifest(run_dir).branches:
        if domain in DEMO_PROMPTS:
            generation = generator.generate(DEMO_PROMPTS[domain])
            console.print(f"[bold]{domain}[/] prompt {DEMO_PROMPTS[domain]!r} ->", repr(generation.text))
            render_generation_routing(console, generation, None)
    seed = load_manifest(run_dir).seed.path
    report = evaluate_task(EvalConfig(models=[seed, str(tuned)], task="arithmetic", problems=problems, scmoe=True), show_progress=False)
    render_task_table(console, report)
