"""Resumable checkpoints of the training loop: DCP shards plus ``trainer_state.json`` (step, tokens, fingerprint).

A checkpoint is written into a hidden ``.step-N`` directory and renamed to ``step-N`` once every
process has written its shards and rank 0 its state file, so a checkpoint that exists is
complete. A resume must match the run's fingerprint: the settings that shape the trajectory,
the data, and the global batch.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.blocks import BlockSource
from moekit.errors import CorruptCheckpointError, MoekitError
from moekit.io.atomic import writing
from moekit.train.engine import Engine
from moekit.train.safe_dcp import check_checkpoint

CHECKPOINT_PREFIX = "step-"


STATE_FILE = "trainer_state.json"


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The complete checkpoints (those with a trainer state file), newest first."""
    if not checkpoint_dir.is_dir():
        return []
    complete = [
        p
        for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if (p / STATE_FILE).is_file() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
    ]
    return sorted(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), reverse=True)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with a trainer state file), or None."""
    return next(iter(complete_checkpoints(checkpoint_dir)), None)


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
        raise CorruptCheckpointError(
            f"Checkpoint {checkpoint} is damaged: {STATE_FILE} cannot be read ({exc}).",
            f"Delete {checkpoint} to resume from an older checkpoint, or delete the checkpoints directory to "
            "start over.",
        )


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any incomplete ones."""
    for path in complete_checkpoints(checkpoint_dir)[keep:]:
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
    checkpoint_dir: Path,
    resume: bool,
    engine: Engine,
    model: torch.nn.Module,
    optimizer: Any,
    fingerprint: dict,
    steps: int,
    tokens_per_step: int,
) -> tuple[int, int]:
    """Load the newest usable checkpoint in ``checkpoint_dir`` when resuming; return (step, tokens) to start from.

    Checkpoints there without ``resume`` are refused (they belong to an unfinished run). A damaged
    checkpoint (unreadable state or metadata, a missing or short shard, a value that would run code)
    is skipped with a warning for the next older one; when none is usable the run stops with the
    path and the fix. A checkpoint of other settings is refused (no fallback: it is not damaged).
    """
    candidates = complete_checkpoints(checkpoint_dir)
    if not candidates:
        return 0, 0
    if not resume:
        raise MoekitError(
            f"{checkpoint_dir} holds checkpoints of an earlier, unfinished run (newest: {candidates[0].name}).",
            "Pass --resume to continue it, or delete that directory to start over.",
        )
    problems, skipped = [], []
    for checkpoint in _agreed(engine, candidates):  # every rank the same list, in the same order
        try:
            state = _agreed(engine, _checked_state(checkpoint, fingerprint, steps, tokens_per_step))
            _load(engine, checkpoint, model, optimizer)  # a collective: a failure on one rank fails them all
        except CorruptCheckpointError as exc:
            problems.append(exc.message)
            skipped.append(checkpoint)
            if engine.is_main_process:
                print(f"warning: {exc.message} Trying an older checkpoint.", file=sys.stderr, flush=True)
            continue
        if engine.is_main_process:  # resumed: the damaged ones no longer hold slots of --keep-checkpoints
            for damaged in skipped:
                _set_aside(damaged)
        return int(state["step"]), int(state["tokens"])
    raise CorruptCheckpointError(
        f"No checkpoint in {checkpoint_dir} can be resumed from: {' '.join(problems)}",
        f"Delete {checkpoint_dir} to start the run over from step 0 (or restore the checkpoints from a copy).",
    )


def _checked_state(checkpoint: Path, fingerprint: dict, steps: int, tokens_per_step: int) -> Any:
    """The checkpoint's state after every check that reads no weights, or the error that stops it (as a value)."""
    try:
        state = read_state(checkpoint)
        _check_fingerprint(checkpoint, state, fingerprint)
        _check_position(checkpoint, state, steps, tokens_per_step)
        check_checkpoint(checkpoint)
        return state
    except MoekitError as exc:
        return exc


def _agreed(engine: Engine, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (ranks that see a shared filesystem differently must still choose alike);
    an exception value is raised on every rank."""
    if engine.distributed and engine.world > 1:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, BaseException):
        raise value
    return value


def _set_aside(checkpoint: Path) -> None:
    """Rename a checkpoint that was passed over (damaged-step-N, kept for a look), so it keeps no slot of
    --keep-checkpoints."""
    target = checkpoint.parent / f"damaged-{checkpoint.name}"
    shutil.rmtree(target, ignore_errors=True)
    checkpoint.rename(target)


def _check_fingerprint(checkpoint: Path, state: dict[str, Any], fingerprint: dict) -> None:
    differences = [k for k in fingerprint if state.get(k) != fingerprint[k]]
    if differences:
        raise MoekitError(
            f"Cannot resume from {checkpoint}: it was made with different {', '.join(differences)}.",
            "Resume with the same data, batch and optimiser options, or delete the checkpoints to start over.",
        )


def _check_position(checkpoint: Path, state: dict[str, Any], steps: int, tokens_per_step: int) -> None:
    """A checkpoint is written after step s with 0 < s < steps, having seen s global batches of tokens."""
    step, tokens = int(state["step"]), int(state["tokens"])
    if not 0 < step < steps or tokens != step * tokens_per_step:
        raise CorruptCheckpointError(
            f"Checkpoint {checkpoint} is damaged: its {STATE_FILE} says step {step} and {tokens:,} tokens, which a run "
            f"of {steps} steps of {tokens_per_step:,} tokens never writes.",
            f"Delete {checkpoint}.",
        )


def _load(engine: Engine, checkpoint: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Load ``checkpoint``; a failure of the files themselves (truncated, zeroed) is a CorruptCheckpointError."""
    try:
        engine.load_checkpoint(checkpoint, model, optimizer)
    except (MoekitError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # DCP wraps what failed in a CheckpointException (a BaseException) per rank
        failures = [error for error, _ in getattr(exc, "failures", {}).values()]
        ours = next((error for error in failures if isinstance(error, MoekitError)), None)
        if ours is not None:
            raise ours from None
        lines = [line.strip() for line in str(failures[0] if failures else exc).splitlines() if line.strip()]
        reason = (lines[-1] if lines else type(exc).__name__)[:200]
        raise CorruptCheckpointError(
            f"Checkpoint {checkpoint} is damaged: loading it failed ({reason}).", f"Delete {checkpoint}."
        ) from exc
