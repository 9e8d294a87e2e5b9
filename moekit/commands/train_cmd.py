"""``moekit train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from moekit.commands.common import DEVICE_OPTION, TEXT_FIELD_OPTION
from moekit.commands.loop_options import saved_weights_note, with_loop_options
from moekit.config import TrainConfig, default_of


@with_loop_options
def train_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="Run directory made by `moekit branch`."),
    branch: list[str] = typer.Option(
        [], "--branch", "-b", help="Branch to train; repeat for several (default: all, in turn)."
    ),
    data: list[str] = typer.Option(
        [], "--data", help="[BRANCH=]PATH training data (.txt/.jsonl/.json/.parquet, dir, glob or hf:NAME); remembered."
    ),
    val_data: list[str] = typer.Option(
        [], "--val-data", help="[BRANCH=]PATH held-out data (default: the last --val-fraction of the training data)."
    ),
    val_fraction: Optional[float] = typer.Option(
        None,
        "--val-fraction",
        help="Share of each domain's tokens held out (default: the split the run recorded, else 0.05).",
    ),
    text_field: str = TEXT_FIELD_OPTION,
    train_params: str = typer.Option(
        default_of(TrainConfig, "train"),
        "--train",
        help="What learns: all | ffn (only the FFNs: attention, norms and embeddings stay the seed's, so mix "
        "averages nothing that diverged) | ffn+norms.",
    ),
    device: Optional[str] = DEVICE_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted run."),
    loop: Any = None,  # a LoopSettings, built by with_loop_options from the shared loop options
) -> None:
    """Train branches of RUN_DIR on their domains (continued pretraining), resumably.

    \b
    Examples:
      moekit train run --branch code --data code.jsonl --max-steps 1000
      moekit train run --data code=code/ --data math=math.parquet --max-tokens 50000000
      moekit train run --branch code --train ffn --max-steps 1000   # experts stay compatible (FlexOlmo-style)
      accelerate launch --num_processes 8 -m moekit train run --branch code --max-steps 1000
    """
    from rich.console import Console

    from moekit.config import TrainConfig
    from moekit.progress import quiet_transformers
    from moekit.steps.train import parse_branch_data, train
    from moekit.train.loop import is_main_process

    quiet_transformers()

    cfg = TrainConfig(
        run_dir=run_dir,
        branches=branch,
        data=parse_branch_data(run_dir, data, branch, "--data"),
        val_data=parse_branch_data(run_dir, val_data, branch, "--val-data"),
        val_fraction=val_fraction,
        text_field=text_field,
        train=train_params,
        resume=resume,
        device=device,
        loop=loop,
    )
    results = train(cfg)
    if not is_main_process():
        return
    console = Console()
    if not results:
        console.print("Every selected branch was already trained by this job; nothing to resume.")
        return
    for result in results:
        evals = ", ".join(f"{d} {v:.3f}" for d, v in result.eval.items())
        resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
        console.print(
            f"[green]Trained[/] {result.branch}: {result.steps} steps{resumed}, {result.tokens:,} tokens, last "
            f"step loss {result.final_loss:.4f}; "
            f"saved as {result.saved_dtype}" + (f", held-out loss of the saved weights: {evals}" if evals else "")
        )
        if note := saved_weights_note(result.unchanged_share, result.saved_dtype):
            console.print(note)
    console.print(f"Branches written in place. Next: moekit mix {run_dir}")
