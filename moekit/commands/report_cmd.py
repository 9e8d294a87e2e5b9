"""``moekit report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import parse_key_values


def report_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run directory (from `moekit branch` or `moekit run`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    prompt: list[str] = typer.Option([], "--prompt", help="DOMAIN=TEXT prompt for the generation samples; repeat (default: the start of each domain's data)."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Generate a short sample per domain with the tuned (else mixed) MoE."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=512, help="Length of each generation sample."),
    inspect: bool = typer.Option(True, "--inspect/--no-inspect", help="Inspect the MoE's routing on the run's data where the run has no (current) inspection; recorded in RUN_DIR/inspect/."),
) -> None:
    """Write one self-contained HTML page for a run: stages and provenance, training curves, the eval table and chart, routing heatmaps, token-level routing and generations.

    \b
    It shows what the run recorded: eval.json (moekit eval RUN_DIR, or the recipe's eval stage), inspect/routing.json
    (the recipe's inspect stage; made here when missing or older than the tuned MoE) and every model's metrics.jsonl.
    Example: moekit report demo-out/run   (then open demo-out/run/report.html)
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.report.run_page import write_report
    from moekit.steps.report import gather_run

    quiet_transformers()
    from moekit.manifest import load_manifest

    load_manifest(run_dir)  # a clear error for what is not a run, before anything is created
    target = out or run_dir / "report.html"
    if target.is_dir():
        from moekit.errors import InvalidOptionError

        raise InvalidOptionError(f"--out {target} is a directory.", "Give a file name, e.g. --out report.html.")
    target.parent.mkdir(parents=True, exist_ok=True)  # before minutes of inspection and generation, not after
    prompts = parse_key_values(prompt, "--prompt") or None
    report = gather_run(run_dir, prompts, generations=generate, max_new_tokens=max_new_tokens, inspect=inspect)
    write_report(report, target)
    console = Console()
    for note in report.missing:
        console.print(f"[yellow]Note:[/] {note}", soft_wrap=True)
    console.print(f"[green]Wrote[/] {target}", soft_wrap=True)
