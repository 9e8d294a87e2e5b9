"""``moekit demo``: the packaged demo recipe, run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def demo_command(
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Work directory (default: demo-out, or demo-tiny-out with --tiny)."
    ),
    tiny: bool = typer.Option(False, "--tiny", help="A seconds-long version on a random tiny model (for tests)."),
    force: bool = typer.Option(False, "--force", help="Delete the work directory first and start from scratch."),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Recipe overrides, e.g. train.max_steps=50."
    ),
) -> None:
    """Run BTX end to end on a laptop CPU with no downloads (about 30 minutes; --tiny: seconds).

    Pretrains a small seed on Python stdlib code, pydoc's English reference text and generated arithmetic,
    branches it into those domains, trains each branch, mixes them with the seed as a generalist expert, tunes the
    MoE, builds the dense and upcycling baselines at equal compute, then compares every model, shows the routing,
    a generation per domain and the arithmetic accuracy (greedy and SCMoE), and writes an HTML report
    (RUN/report.html). Re-running skips finished stages.
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.report.tables import (
        render_generation_routing,
        render_harness_table,
        render_run_outcome,
        render_task_table,
    )
    from moekit.steps.demo import run_demo

    quiet_transformers()
    console = Console()
    result = run_demo(out, tiny, force, overrides or [], log=console.print)
    render_run_outcome(console, result.outcome)
    for domain, prompt, generation in result.generations:
        console.print(f"[bold]{domain}[/] prompt {prompt!r} ->", repr(generation.text))
        render_generation_routing(console, generation, None)
    if result.arithmetic is not None:
        render_task_table(console, result.arithmetic)
    if result.harness is not None:
        render_harness_table(console, result.harness)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    # soft_wrap: a path must stay copyable
    console.print(f"[green]Report:[/] {result.report} (open it in a browser)", soft_wrap=True)
    tuned = result.workdir / "run" / "tuned"
    if (tuned / "config.json").is_file():
        console.print(f"[green]Use the MoE:[/] moekit generate {tuned} --prompt TEXT --routing", soft_wrap=True)
        if not (tuned / "modeling_moekit_moe.py").is_file():  # moekit's own family is for transformers only
            console.print(f"  or serve it: vllm serve {tuned}", soft_wrap=True)
