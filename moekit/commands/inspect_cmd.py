"""``moekit inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import parse_key_values


def inspect_command(
    model: str = typer.Argument(..., metavar="MODEL", help="A Hugging Face model directory (or hub id); MoE or dense."),
    data: list[str] = typer.Option([], "--data", help="DOMAIN=PATH data to route; repeat. Without it: static statistics only."),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Tokens per domain."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of .jsonl/.json/.parquet records."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file (schema: docs/commands/inspect.md)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG heatmaps and report.html to this directory."),
    detail: bool = typer.Option(False, "--detail", help="Show every layer and expert instead of a summary."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Show DOMAIN's first block coloured by each token's top expert."),
    tokens_layer: Optional[int] = typer.Option(None, "--tokens-layer", help="MoE layer for --tokens, counted over the layers that have a router (default: the middle one)."),
) -> None:
    """Show an MoE's experts and routers, and how it routes each domain's tokens.

    \b
    Examples:
      moekit inspect run/mixed
      moekit inspect run/tuned --data code=code.jsonl --data math=math.jsonl --json routing.json --plot routing/
    """
    from rich.console import Console

    from moekit.config import InspectConfig
    from moekit.progress import quiet_transformers
    from moekit.report.tables import render_routing, render_static, render_tokens
    from moekit.steps.inspect import inspect_routing, inspect_static, write_outputs

    quiet_transformers()

    cfg = InspectConfig(
        model=model, data={d: [p] for d, p in parse_key_values(data, "--data").items()}, seq_len=seq_len, batch_size=batch_size,
        max_tokens=max_tokens, text_field=text_field, json_path=json_path, plot_dir=plot, tokens=tokens, tokens_layer=tokens_layer,
    )
    console = Console()
    model_dir, static = inspect_static(model)
    render_static(console, static, detail)
    report = {"model": str(model_dir), "static": static, "routing": None}
    if cfg.data:
        report["routing"] = inspect_routing(cfg, model_dir, static)
        render_routing(console, report["routing"], detail)
        if tokens:
            render_tokens(console, report["routing"], tokens, tokens_layer)
    for path in write_outputs(cfg, report):
        console.print(f"wrote {path}")
