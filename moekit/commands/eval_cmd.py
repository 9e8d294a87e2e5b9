"""``moekit eval``."""

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
from moekit.config import EvalConfig, default_of


def eval_command(
    models: list[str] = typer.Argument(
        ...,
        metavar="MODEL...",
        help="Model directories (or hub ids); a run directory adds its seed, branches, mixed and tuned models.",
    ),
    data: list[str] = typer.Option(
        [],
        "--data",
        help="DOMAIN=PATH held-out data; repeat (default with a run directory: its branches' held-out splits).",
    ),
    max_tokens: int = MAX_TOKENS_OPTION,
    seq_len: Optional[int] = SEQ_LEN_OPTION,
    batch_size: int = BATCH_SIZE_OPTION,
    text_field: str = TEXT_FIELD_OPTION,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    device: Optional[str] = DEVICE_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace the --json file if it holds an earlier eval report."),
    task: Optional[str] = typer.Option(
        None,
        "--task",
        help="Score a generation task instead of held-out loss: arithmetic (exact match on held-out problems).",
    ),
    problems: int = typer.Option(default_of(EvalConfig, "problems"), "--problems", help="Problems of --task."),
    max_new_tokens: int = typer.Option(
        default_of(EvalConfig, "max_new_tokens"), "--max-new-tokens", help="Tokens generated per problem of --task."
    ),
    tasks: list[str] = typer.Option(
        [],
        "--tasks",
        help="lm-evaluation-harness tasks (names or groups; repeat or comma-separate), run on each model as moekit "
        "loads it. Needs the harness extra.",
    ),
    tasks_dir: Optional[Path] = typer.Option(
        None, "--tasks-dir", help="A folder of lm-eval task YAMLs (local files: no hub needed)."
    ),
    task_limit: Optional[int] = typer.Option(
        None, "--task-limit", min=1, help="lm-eval: at most this many documents per task."
    ),
    scmoe: bool = typer.Option(
        False,
        "--scmoe",
        help="With --task or --tasks: also score each MoE with SCMoE decoding (see moekit generate).",
    ),
    scmoe_beta: float = typer.Option(default_of(EvalConfig, "scmoe_beta"), "--scmoe-beta", help="SCMoE strength."),
    scmoe_alpha: float = typer.Option(
        default_of(EvalConfig, "scmoe_alpha"), "--scmoe-alpha", help="SCMoE plausibility threshold."
    ),
    scmoe_rank: int = typer.Option(
        default_of(EvalConfig, "scmoe_rank"),
        "--scmoe-rank",
        help="SCMoE's weak pass routes each token to its expert of this rank only.",
    ),
) -> None:
    """Compare models by held-out loss and perplexity per domain (best per domain marked).

    \b
    Examples:
      moekit eval run                                   (seed, branches, mixed, tuned on the branches' held-out data)
      moekit eval seed run/tuned --data code=code-test.jsonl --data math=math-test.jsonl --json eval.json
      moekit eval run --task arithmetic --scmoe            (exact-match accuracy, greedy and SCMoE)
      moekit eval seed run/tuned --tasks my_task --tasks-dir tasks/ --scmoe   (lm-evaluation-harness)
    """
    from rich.console import Console

    from moekit.errors import InvalidOptionError
    from moekit.progress import quiet_transformers
    from moekit.report.tables import render_eval_table, render_harness_table, render_task_table
    from moekit.steps.evaluate import evaluate_with_harness, record_eval
    from moekit.steps.evaluate_task import evaluate_task
    from moekit.tasks import TASKS

    quiet_transformers()

    if task is not None and task not in TASKS:
        raise InvalidOptionError(f"Unknown --task '{task}'.", f"Tasks: {', '.join(TASKS)}.")
    if scmoe and task is None and not tasks:
        raise InvalidOptionError(
            "--scmoe scores a generation task; held-out loss has no decoding.",
            "Add --task arithmetic, or lm-eval tasks with --tasks.",
        )
    specs = {d: [p] for d, p in parse_key_values(data, "--data").items()}
    cfg = EvalConfig(**{**fields_of(EvalConfig, locals()), "data": specs})
    console = Console()
    if task is not None:
        report = evaluate_task(cfg)
        render_task_table(console, report)
    else:
        report = evaluate_with_harness(cfg)
        if "results" in report:
            render_eval_table(console, report)
        if "harness" in report:
            render_harness_table(console, report["harness"])
    written, recorded_in = record_eval(cfg, report)
    if written is not None:
        console.print(f"wrote {written}")
    if recorded_in is not None:
        console.print(f"recorded in {recorded_in} (moekit report {recorded_in.parent} shows it)")
