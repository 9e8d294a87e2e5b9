"""``moekit inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import (
    BATCH_SIZE_OPTION,
    DEVICE_OPTION,
    MAX_TOKENS_OPTION,
    SEQ_LEN_OPTION,
    TEXT_FIELD_OPTION,
    fields_of,
    parse_key_values,
)


def inspect_command(
    model: str = typer.Argument(..., metavar="MODEL", help="A Hugging Face model directory (or hub id); MoE or dense."),
    data: list[str] = typer.Option(
        [], "--data", help="DOMAIN=PATH data to route; repeat. Without it: static statistics only."
    ),
    max_tokens: int = MAX_TOKENS_OPTION,
    seq_len: Optional[int] = SEQ_LEN_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    text_field: str = TEXT_FIELD_OPTION,
    json_path: Optional[Path] = typer.Option(
        None, "--json", help="Write every number to this JSON file (schema: docs/commands/inspect.md)."
    ),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write PNG heatmaps and report.html to this directory."),
    device: Optional[str] = DEVICE_OPTION,
    force: bool = typer.Option(
        False, "--force", help="Replace --json and --plot outputs that hold an earlier inspection."
    ),
    detail: bool = typer.Option(False, "--detail", help="Show every layer and expert instead of a summary."),
    tokens: Optional[str] = typer.Option(
        None, "--tokens", help="Show DOMAIN's first block coloured by each token's top expert."
    ),
    tokens_layer: Optional[int] = typer.Option(
        None,
        "--tokens-layer",
        help="MoE layer for --tokens, counted over the layers that have a router (default: the middle one).",
    ),
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
    from moekit.steps.inspect import inspect_model

    quiet_transformers()

    specs = {d: [p] for d, p in parse_key_values(data, "--data").items()}
    cfg = InspectConfig(**{**fields_of(InspectConfig, locals()), "data": specs, "plot_dir": plot})
    console = Console()
    report, written = inspect_model(cfg, on_static=lambda static: render_static(console, static, detail))
    if report["routing"] is not None:
        render_routing(console, report["routing"], detail)
        if tokens:
            render_tokens(console, report["routing"], tokens, tokens_layer)
    for path in written:
        console.print(f"wrote {path}")
