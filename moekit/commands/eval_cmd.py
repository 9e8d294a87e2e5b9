"""``moekit eval``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import parse_key_values


def eval_command(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Model directories (or hub ids); a run directory adds its seed, branches, mixed and tuned models."),
    data: list[str] = typer.Option([], "--data", help="DOMAIN=PATH held-out data; repeat (default with a run directory: its branches' held-out splits)."),
    max_tokens: int = typer.Option(65536, "--max-tokens", help="Tokens per domain."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per forward pass."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of .jsonl/.json/.parquet records."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    task: Optional[str] = typer.Option(None, "--task", help="Score a generation task instead of held-out loss: arithmetic (exact match on held-out problems)."),
    problems: int = typer.Option(200, "--problems", help="Problems of --task."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", help="Tokens generated per problem of --task."),
    scmoe: bool = typer.Option(False, "--scmoe", help="With --task: also score each MoE with SCMoE decoding (see moekit generate)."),
    scmoe_beta: float = typer.Option(0.5, "--scmoe-beta", help="SCMoE strength."),
    scmoe_alpha: float = typer.Option(0.1, "--scmoe-alpha", help="SCMoE plausibility threshold."),
    scmoe_rank: int = typer.Option(2, "--scmoe-rank", help="SCMoE's weak pass routes each token to its expert of this rank only."),
) -> None:
    """Compare models by held-out loss and perplexity per domain (best per domain marked).

    \b
    Examples:
      moekit eval run                                   (seed, branches, mixed, tuned on the branches' held-out data)
      moekit eval seed run/tuned --data code=code-test.jsonl --data math=math-test.jsonl --json eval.json
      moekit eval run --task arithmetic --scmoe            (exact-match accuracy, greedy and SCMoE)
    """
    from rich.console import Console

    from moekit.config import EvalConfig
    from moekit.errors import InvalidOptionError
    from moekit.progress import quiet_transformers
    from moekit.report.tables import render_eval_table
    from moekit.steps.evaluate import evaluate_models, is_run_dir
    from moekit.tasks import TASKS

    quiet_transformers()

    if task is not None and task not in TASKS:
        raise InvalidOptionError(f"Unknown --task '{task}'.", f"Tasks: {', '.join(TASKS)}.")
    if scmoe and task is None:
        raise InvalidOptionError("--scmoe scores a generation task; held-out loss has no decoding.", "Add --task arithmetic.")
    cfg = EvalConfig(models=models, data={d: [p] for d, p in parse_key_values(data, "--data").items()}, seq_len=seq_len,
                     batch_size=batch_size, max_tokens=max_tokens, text_field=text_field, json_path=json_path, task=task,
                     problems=problems, max_new_tokens=max_new_tokens, scmoe=scmoe, scmoe_beta=scmoe_beta, scmoe_alpha=scmoe_alpha,
                     scmoe_rank=scmoe_rank)
    console = Console()
    if task is not None:
        from moekit.report.tables import render_task_table
        from moekit.steps.evaluate_task import evaluate_task

        report = evaluate_task(cfg)
        render_task_table(console, report)
    else:
        report = evaluate_models(cfg)
        render_eval_table(console, report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        console.print(f"wrote {json_path}")
    runs = [Path(m) for m in models if is_run_dir(Path(m))]
    if task is None and not data and len(models) == 1 and runs:  # a run's own table, on its recorded split: kept for `moekit report`
        from moekit.io.atomic import write_text_atomic

        write_text_atomic(runs[0] / "eval.json", json.dumps(report, indent=1))
        console.print(f"recorded in {runs[0] / 'eval.json'} (moekit report {runs[0]} shows it)")
