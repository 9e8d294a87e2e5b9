"""``moekit report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import parse_key_values
from moekit.config import REPORT_SAMPLE_TOKENS


def report_command(
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="Run directory (from `moekit branch` or `moekit run`)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    prompt: list[str] = typer.Option(
        [],
        "--prompt",
        help="DOMAIN=TEXT prompt for the generation samples; repeat (default: the start of each domain's data).",
    ),
    generate: bool = typer.Option(
        True, "--generate/--no-generate", help="Generate a short sample per domain with the tuned (else mixed) MoE."
    ),
    max_new_tokens: int = typer.Option(
        REPORT_SAMPLE_TOKENS, "--max-new-tokens", min=1, max=512, help="Length of each generation sample."
    ),
    inspect: bool = typer.Option(
        True,
        "--inspect/--no-inspect",
        help="Inspect the MoE's routing on the run's data where the run has no (current) inspection; recorded "
        "in RUN_DIR/inspect/.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the --out file if it holds an earlier report."),
) -> None:
    """Write one self-contained HTML page for a run: stages and provenance, training curves, the eval table and
    chart, routing heatmaps, token-level routing and generations.

    \b
    It shows what the run recorded: eval.json (moekit eval RUN_DIR, or the recipe's eval stage), inspect/routing.json
    (the recipe's inspect stage; made here when missing or older than the tuned MoE) and every model's metrics.jsonl.
    Example: moekit report demo-out/run   (then open demo-out/run/report.html)
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.steps.report import report_run

    quiet_transformers()
    prompts = parse_key_values(prompt, "--prompt") or None
    report, target = report_run(run_dir, out, prompts, generate, max_new_tokens, inspect, force)
    console = Console()
    for note in report.missing:
        console.print(f"[yellow]Note:[/] {note}", soft_wrap=True)
    console.print(f"[green]Wrote[/] {target}", soft_wrap=True)
