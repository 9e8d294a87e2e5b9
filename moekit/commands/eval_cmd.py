"""``moekit eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moekit.cli import app, parse_key_values, user_errors


@app.command("eval")
@user_errors
def eval_command(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Model directories (or hub ids); a run directory adds its seed, branches, mixed and tuned models."),
    data: list[str] = typer.Option([], "--data", help="DOMAIN=PATH held-out data; repeat (default with a run directory: its branches' held-out splits)."),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Tokens per domain."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of .jsonl/.json/.parquet records."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Compare models by held-out loss and perplexity per domain (best per domain marked).

    \b
    Examples:
      moekit eval run                                   (seed, branches, mixed, tuned on the branches' held-out data)
      moekit eval seed run/tuned --data code=code-test.jsonl --data math=math-test.jsonl --json eval.json
    """
    from rich.console import Console

    from moekit.config import EvalConfig
    from moekit.progress import quiet_transformers
    from moekit.report import render_eval_table
    from moekit.steps.evaluate import evaluate_models

    quiet_transformers()

    cfg = EvalConfig(models=models, data={d: [p] for d, p in parse_key_values(data, "--data").items()}, seq_len=seq_len,
                     batch_size=batch_size, max_tokens=max_tokens, text_field=text_field, json_path=json_path)
    report = evaluate_models(cfg)
    console = Console()
    render_eval_table(console, report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        console.print(f"wrote {json_path}")
