"""``moekit demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli import app, user_errors


@app.command("demo")
@user_errors
def demo_command(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Directory for the demo's seed, data, run and models."),
    family: str = typer.Option("llama", "--family", help="Dense family of the tiny seed: llama | mistral | qwen2 | qwen3 | olmo2 | granite | phi3."),
    steps: int = typer.Option(80, "--steps", min=1, help="Training steps per branch."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Run the pipeline on a tiny locally built model: branch, train, mix, tune, upcycle (CPU, no downloads)."""
    from rich.console import Console
    from rich.table import Table

    from moekit.arch import get_adapter
    from moekit.steps.demo import run_demo

    get_adapter(family)  # unsupported family: clear error before any work
    result = run_demo(out, family, force=force, steps=steps)
    console = Console()
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result")
    for check, value in result.checks.items():
        checks.add_row(check, value)
    console.print(checks)
    domains = list(next(iter(result.losses.values())))
    table = Table(title="held-out loss per domain (lower is better; * = best)")
    table.add_column("model")
    for domain in domains:
        table.add_column(domain, justify="right")
    best = {d: min(losses[d] for losses in result.losses.values()) for d in domains}
    for name, losses in result.losses.items():
        table.add_row(name, *(f"{losses[d]:.3f}{' *' if losses[d] == best[d] else ''}" for d in domains))
    console.print(table)
    shares = result.mixed.router_stats.get("init_in_domain_top1", {})
    console.print("Centroid router at init: tokens routed to their own domain's expert: " + ", ".join(f"{d} {v:.0%}" for d, v in shares.items()))
    console.print(f"Outputs under {result.out}: run/branches (trained), run/mixed (BTX MoE), run/tuned (tuned MoE), upcycled/ (baseline).")
