"""``moekit train``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.cli import app, user_errors


def parse_branch_data(items: list[str], branches: list[str], known: list[str], option: str) -> dict[str, list[str]]:
    """Map repeated ``[BRANCH=]PATH`` options to branch -> specs.

    ``BRANCH=PATH`` names the branch; a bare PATH belongs to the single ``--branch`` given.
    """
    from moekit.errors import InvalidOptionError

    result: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name in known:
            result.setdefault(name, []).append(path)
        elif len(branches) == 1:
            result.setdefault(branches[0], []).append(item)
        else:
            raise InvalidOptionError(
                f"{option} {item}: which branch is it for?",
                f"Write {option} BRANCH=PATH (branches: {', '.join(known)}), or train one --branch at a time.",
            )
    return result


@app.command("train")
@user_errors
def train_command(
    run_dir: Path = typer.Argument(..., help="Run directory made by `moekit branch`."),
    branch: list[str] = typer.Option([], "--branch", "-b", help="Branch to train; repeat for several (default: all, in turn)."),
    data: list[str] = typer.Option([], "--data", help="[BRANCH=]PATH training data (.txt/.jsonl/.json/.parquet, dir, glob or hf:NAME); remembered."),
    val_data: list[str] = typer.Option([], "--val-data", help="[BRANCH=]PATH held-out data (default: the last --val-fraction of the training data)."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of packed blocks held out for validation."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of .jsonl/.json/.parquet records."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimiser steps per branch."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Tokens per branch (instead of --max-steps)."),
    seq_len: int = typer.Option(1024, "--seq-len", help="Tokens per packed block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Blocks per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimiser step per process."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (BTX: 1e-4)."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Cosine decays to lr x this (BTX: 0.1)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warmup steps (default: min(100, steps/10))."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (not on norms/biases)."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm (0: off)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations to save memory."),
    eval_every: int = typer.Option(100, "--eval-every", help="Steps between held-out evaluations of every domain (0: end only)."),
    eval_blocks: int = typer.Option(32, "--eval-blocks", help="Held-out blocks per domain per evaluation."),
    save_every: int = typer.Option(500, "--save-every", help="Steps between resumable checkpoints (0: none)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Checkpoints kept (older ones are pruned)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order."),
    report_to: list[str] = typer.Option([], "--report-to", help="Also log to: tensorboard (metrics.jsonl is always written)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted run."),
) -> None:
    """Train branches of RUN_DIR on their domains (continued pretraining), resumably.

    \b
    Examples:
      moekit train run --branch code --data code.jsonl --max-steps 1000
      moekit train run --data code=code/ --data math=math.parquet --max-tokens 50000000
      accelerate launch --num_processes 8 -m moekit train run --branch code --max-steps 1000
    """
    from rich.console import Console

    from moekit.config import LoopSettings, TrainConfig
    from moekit.manifest import load_manifest
    from moekit.steps.train import train
    from moekit.training import is_main_process

    known = list(load_manifest(run_dir).branches)
    loop = LoopSettings(
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, max_tokens=max_tokens, lr=lr,
        min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
        precision=precision, gradient_checkpointing=gradient_checkpointing, eval_every=eval_every, eval_blocks=eval_blocks,
        save_every=save_every, keep_checkpoints=keep_checkpoints, seed=seed, report_to=report_to,
    )
    cfg = TrainConfig(
        run_dir=run_dir, branches=branch, data=parse_branch_data(data, branch, known, "--data"),
        val_data=parse_branch_data(val_data, branch, known, "--val-data"), val_fraction=val_fraction,
        text_field=text_field, resume=resume, loop=loop,
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
        console.print(f"[green]Trained[/] {result.branch}: {result.steps} steps{resumed}, {result.tokens:,} tokens, loss {result.final_loss:.4f}; held-out loss: {evals}")
    console.print(f"Branches written in place. Next: moekit mix {run_dir}")
