"""Resumable checkpoints of the training loop: DCP shards plus ``trainer_state.json`` (step, tokens, fingerprint).

A checkpoint is written into a hidden ``.step-N`` directory and renamed to ``step-N`` once every
process has written its shards and rank 0 its state file, so a checkpoint that exists is
complete. A resume must match the run's fingerprint: the settings that shape the trajectory,
the data, and the global batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.blocks import BlockSource
from moekit.errors import MoekitError
from moekit.io.atomic import writing
from moekit.train.engine import Engine

CHECKPOINT_PREFIX = "step-"


STATE_FILE = "trainer_state.json"


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with a trainer state file), or None."""
    complete = [p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The loop state (step, tokens, settings) stored with a checkpoint; MoekitError if it is damaged."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("step"), int)
            or not isinstance(state.get("tokens"), int)
        ):
            raise ValueError("no integer step and tokens")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoekitError(
            f"Checkpoint {checkpoint} is damaged: {STATE_FILE} cannot be read ({exc}).",
            f"Delete {checkpoint} to resume from an older checkpoint, or delete the checkpoints directory to "
            "start over.",
        )


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete ones."""
    complete = sorted(
        (p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    for path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoint_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


# Settings that do not change the trajectory, so a resume may change them.
# (batch_size and grad_accum may change as long as the global batch stays: it is checked on its own,
# and any split of it into processes x micro-batches x accumulation gives the same batches)
_RESUMABLE_CHANGES = {
    "eval_every",
    "eval_blocks",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "precision",
    "save_dtype",
    "batch_size",
    "grad_accum",
    "shard",
}


def run_fingerprint(settings: LoopSettings, blocks: BlockSource, world: int, precision: str) -> dict[str, Any]:
    """What must not change between a run and its resume (the step budget too: it shapes the LR).

    The data is identified by the blocks' fingerprint (store keys, token range, block size,
    mixture shares), which comes from metadata: no token is read for it.
    """
    kept = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _RESUMABLE_CHANGES}
    return {
        "settings": kept,
        "data": blocks.fingerprint(),
        "global_batch_blocks": settings.batch_size * settings.grad_accum * world,
        "precision": precision,
    }


def save_checkpoint(
    engine: Engine,
    model: torch.nn.Module,
    optimizer: Any,
    checkpoint_dir: Path,
    step: int,
    tokens: int,
    fingerprint: dict,
    keep: int,
) -> None:
    """Write a DCP checkpoint atomically: a hidden directory, renamed once every process has written its shards."""
    staging, final = checkpoint_dir / f".step-{step}", checkpoint_dir / f"step-{step}"
    if engine.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    engine.wait_for_everyone()
    try:
        with writing(staging, f"checkpoint {final}"):
            engine.save_checkpoint(staging, model, optimizer)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an incomplete checkpoint is never resumed from, but takes space
        raise
    engine.wait_for_everyone()
    if engine.is_main_process:
        state = {"step": step, "tokens": tokens, "world_size": engine.world, "shard": engine.shard, **fingerprint}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        prune_checkpoints(checkpoint_dir, keep)
    engine.wait_for_everyone()


def resume_point(
    checkpoint_dir: Path, resume: bool, engine: Engine, model: torch.nn.Module, optimizer: Any, fingerprint: dict
) -> tuple[int, int]:
    """Load the newest checkpoint in ``checkpoint_dir`` when resuming; return (step, tokens) to start from.

    Checkpoints there without ``resume`` are refused (they belong to an unfinished run).
    """
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir.exists() else None
    if latest is None:
        return 0, 0
    if not resume:
        raise MoekitError(
            f"{checkpoint_dir} holds checkpoints of an earlier, unfinished run (newest: {latest.name}).",
            "Pass --resume to continue it, or delete that directory to start over.",
        )
    state = read_state(latest)
    differences = [k for k in fingerprint if state.get(k) != fingerprint[k]]
    if differences:
        raise MoekitError(
            f"Cannot resume from {latest}: it was made with different {', '.join(differences)}.",
            "Resume with the same data, batch and optimiser options, or delete the checkpoints to start over.",
        )
    engine.load_checkpoint(latest, model, optimizer)
    return int(state["step"]), int(state["tokens"])
