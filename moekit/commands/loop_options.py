"""Training-loop options shared by ``train`` and ``tune``, declared once.

``with_loop_options`` adds the options below to a command's signature (Typer reads signatures)
and hands the command one ``loop: LoopSettings`` argument built from them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Optional

import typer

from moekit.config import LoopSettings, default_of


def _default(name: str) -> Any:
    return default_of(LoopSettings, name)


LOOP_OPTIONS: dict[str, tuple[Any, Any]] = {
    "max_steps": (Optional[int], typer.Option(None, "--max-steps", help="Optimiser steps.")),
    "max_tokens": (
        Optional[int],
        typer.Option(None, "--max-tokens", help="Tokens to train on (instead of --max-steps)."),
    ),
    "seq_len": (
        Optional[int],
        typer.Option(
            None,
            "--seq-len",
            help=f"Tokens per packed block (default {_default('seq_len')}, or the model's context when that is "
            "shorter).",
        ),
    ),
    "batch_size": (
        int,
        typer.Option(_default("batch_size"), "--batch-size", help="Blocks per micro-batch per process."),
    ),
    "grad_accum": (
        int,
        typer.Option(_default("grad_accum"), "--grad-accum", help="Micro-batches per optimiser step per process."),
    ),
    "lr": (float, typer.Option(_default("lr"), "--lr", help="Peak learning rate (BTX: 1e-4).")),
    "min_lr_ratio": (
        float,
        typer.Option(_default("min_lr_ratio"), "--min-lr-ratio", help="Cosine decays to lr x this (BTX: 0.1)."),
    ),
    "warmup_steps": (
        Optional[int],
        typer.Option(None, "--warmup-steps", help="Linear warmup steps (default: min(100, steps/10))."),
    ),
    "weight_decay": (
        float,
        typer.Option(_default("weight_decay"), "--weight-decay", help="AdamW weight decay (not on norms/biases)."),
    ),
    "grad_clip": (float, typer.Option(_default("grad_clip"), "--grad-clip", help="Clip the gradient norm (0: off).")),
    "precision": (
        str,
        typer.Option(
            _default("precision"), "--precision", help="auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16."
        ),
    ),
    "shard": (
        str,
        typer.Option(
            _default("shard"),
            "--shard",
            help="none: a full model per process (DDP under torchrun) | fsdp: FSDP2, each process holds 1/N of "
            "the weights, gradients and optimiser state.",
        ),
    ),
    "save_dtype": (
        str,
        typer.Option(
            _default("save_dtype"),
            "--save-dtype",
            help="Saved weights: auto (the input's dtype) | float32 | bfloat16 | float16. float32 keeps small "
            "updates that bf16 rounds away.",
        ),
    ),
    "gradient_checkpointing": (
        bool,
        typer.Option(
            _default("gradient_checkpointing"), "--gradient-checkpointing", help="Recompute activations to save memory."
        ),
    ),
    "eval_every": (
        int,
        typer.Option(
            _default("eval_every"),
            "--eval-every",
            help="Steps between held-out evaluations of every domain (0: end only).",
        ),
    ),
    "eval_blocks": (
        int,
        typer.Option(_default("eval_blocks"), "--eval-blocks", help="Held-out blocks per domain per evaluation."),
    ),
    "save_every": (
        int,
        typer.Option(_default("save_every"), "--save-every", help="Steps between resumable checkpoints (0: none)."),
    ),
    "keep_checkpoints": (
        int,
        typer.Option(
            _default("keep_checkpoints"), "--keep-checkpoints", help="Checkpoints kept (older ones are pruned)."
        ),
    ),
    "seed": (int, typer.Option(_default("seed"), "--seed", help="Seed for the data order.")),
    "report_to": (
        list[str],
        typer.Option(
            _default("report_to"),
            "--report-to",
            help="Also log to: tensorboard, trackio, wandb, mlflow (repeat, or comma-separated; metrics.jsonl is "
            "always written). Offline: WANDB_MODE=offline, TRACKIO_DIR, MLFLOW_TRACKING_URI (default "
            "WORK_DIR/mlruns).",
        ),
    ),
}


def with_loop_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``command`` the loop options; it receives them as ``loop: LoopSettings``."""
    signature = inspect.signature(command)
    own = [p for name, p in signature.parameters.items() if name != "loop"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in LOOP_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in LOOP_OPTIONS}
        if values["seq_len"] is None:  # not given: the default, fitted to the model's context by the step
            del values["seq_len"]
        return command(*args, loop=LoopSettings(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    # Typer resolves annotations with get_type_hints: give it the command's own (minus loop)
    # plus the real types of the added options.
    annotations = {k: v for k, v in command.__annotations__.items() if k != "loop"}
    wrapper.__annotations__ = {**annotations, **{name: kind for name, (kind, _) in LOOP_OPTIONS.items()}}
    return wrapper


# Above this share of weights left bit-identical by training (after rounding to the saved
# dtype), the run's updates were mostly smaller than the dtype's resolution: say so.
ROUNDING_WARN_SHARE = 0.2


def saved_weights_note(unchanged_share: float | None, saved_dtype: str, all_trained: bool = True) -> str | None:
    """A line about how much of the update survived saving, or None when there is nothing to say.

    ``all_trained``: every weight was trainable (a share of untouched weights is then a warning
    sign; with frozen parts it is expected).
    """
    if unchanged_share is None or not all_trained or unchanged_share < ROUNDING_WARN_SHARE:
        return None
    return (
        f"[yellow]warning:[/] {unchanged_share:.0%} of the saved weights are bit-identical to the input: most "
        "updates were "
        f"smaller than {saved_dtype}'s resolution and were rounded away. Train longer or with a higher --lr, or keep "
        "full precision with --save-dtype float32."
    )
