"""``moekit demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli import app, user_errors


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Directory for the demo's seed, run and models."),
    family: str = typer.Option("llama", "--family", help="Dense family of the tiny seed: llama | mistral | qwen2 | qwen3 | olmo2 | granite | phi3."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Run the pipeline on a tiny locally built model (CPU, seconds, no downloads)."""
    from rich.console import Console
    from rich.table import Table

    from moekit.arch import get_adapter
    from moekit.steps.demo import run_demo

    get_adapter(family)  # unsupported family: clear error before any work
    result = run_demo(out, family, force=force)
    console = Console()
    table = Table(title="moekit demo")
    table.add_column("check")
    table.add_column("result")
    for check, value in result.checks.items():
        table.add_row(check, value)
    console.print(table)
    shares = result.mixed.router_stats.get("init_in_domain_top1", {})
    console.print("Centroid router, tokens routed to their own domain's expert: " + ", ".join(f"{d} {v:.0%}" for d, v in shares.items()))
    console.print(f"Outputs: {result.mixed.out} (BTX mix), {result.upcycled.out} (upcycled). Try:")
    console.print(f"  python -c \"from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('{result.mixed.out}'))\"")
