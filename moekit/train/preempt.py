"""Stopping at a checkpoint when a scheduler asks: the time limit is near, or the job is preempted.

A launcher that wants this sets ``MOEKIT_STOP_FILE`` to a path and creates that file when the
job should stop (``moekit run``'s Slurm jobs do it on the ``SIGUSR1`` that ``sbatch
--signal=B:USR1@SECONDS`` sends before the time limit). A file, not a signal, because it reaches
every process of a job the same way, through ``srun`` and ``torchrun`` and across nodes. After
each step the main process looks for the file and every process learns its answer (one
all-reduce of a scalar), so all of them save the same step and stop together.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moekit.errors import StoppedToRequeue
from moekit.train.engine import Engine

STOP_FILE_ENV = "MOEKIT_STOP_FILE"


def stop_requested(engine: Engine) -> bool:
    """Whether this job was asked to stop (the same answer on every process); False when no launcher asks."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return False
    asked = engine.is_main_process and Path(path).exists()
    return bool(engine.sum(torch.tensor(float(asked))).item() > 0)


def stopped(step: int, steps: int, checkpoint_dir: Path) -> StoppedToRequeue:
    """The error that ends a job stopped at ``step`` (its checkpoint saved in ``checkpoint_dir``)."""
    return StoppedToRequeue(
        f"Stopped at step {step}/{steps} as the job's scheduler asked (time limit near, or preempted); the "
        f"checkpoint is in {checkpoint_dir}.",
        "The requeued job (or running the same command with --resume) continues from it.",
    )
