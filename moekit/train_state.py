"""Pieces of the training loop that are pure functions of the step, plus checkpoints and metrics.

Making the data order and the learning rate functions of the step number (not of iterator or
scheduler objects) is what makes resume exact and data-parallel runs equal to single-process
ones: a resumed run recomputes both from the step it loads, and every rank derives its share of
the global batch from the same permutation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.errors import MoekitError

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def total_steps(settings: LoopSettings, tokens_per_step: int) -> int:
    """Optimiser steps to run: max_steps, or enough steps to cover max_tokens."""
    if settings.max_steps is not None:
        return settings.max_steps
    assert settings.max_tokens is not None
    return max(1, math.ceil(settings.max_tokens / tokens_per_step))


def warmup_steps(settings: LoopSettings, steps: int) -> int:
    """Linear warmup length: the setting, or min(100, steps // 10) as in BTX (100 steps)."""
    return settings.warmup_steps if settings.warmup_steps is not None else min(100, steps // 10)


def learning_rate(step: int, settings: LoopSettings, steps: int) -> float:
    """LR for optimiser step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    warmup = warmup_steps(settings, steps)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


class BlockSchedule:
    """Which blocks each rank's micro-batches hold at each step: epochs of seeded permutations.

    Global position ``p`` (counting blocks over the whole run) is block ``perm_e[p mod N]`` of
    epoch ``e = p // N``. Step s covers positions [s*G, (s+1)*G) with G = micro * accum * world;
    micro-batch i of rank r takes positions s*G + (i*world + r)*micro ... + micro.
    """

    def __init__(self, num_blocks: int, micro: int, accum: int, world: int, seed: int) -> None:
        self.num_blocks, self.micro, self.accum, self.world, self.seed = num_blocks, micro, accum, world, seed
        self.global_batch = micro * accum * world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # int32 halves the one array that grows with the corpus (4 bytes per block); torch draws the
            # same permutation for either dtype, so runs and checkpoints from int64 versions resume alike
            dtype = torch.int32 if self.num_blocks < 2**31 else torch.int64
            self._epoch, self._perm = epoch, torch.randperm(self.num_blocks, generator=generator, dtype=dtype)
        return self._perm

    def indices(self, step: int, micro_index: int, rank: int) -> torch.Tensor:
        """Block indices of micro-batch ``micro_index`` of ``rank`` at ``step``."""
        start = step * self.global_batch + (micro_index * self.world + rank) * self.micro
        positions = range(start, start + self.micro)
        return torch.stack([self._permutation(p // self.num_blocks)[p % self.num_blocks] for p in positions]).long()


class MetricsLogger:
    """Append metrics rows to ``metrics.jsonl`` (and TensorBoard when asked), main process only."""

    def __init__(self, work_dir: Path, enabled: bool, report_to: list[str], resume_step: int) -> None:
        self.path = work_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(work_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop rows a killed run logged past its last checkpoint, so the file matches one clean run."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain 'step')."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.close()


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with a trainer state file), or None."""
    complete = [p for p in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The loop state (step, tokens, settings) stored with a checkpoint; MoekitError if it is damaged."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("tokens"), int):
            raise ValueError("no integer step and tokens")
        return state
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MoekitError(
            f"Checkpoint {checkpoint} is damaged: {STATE_FILE} cannot be read ({exc}).",
            f"Delete {checkpoint} to resume from an older checkpoint, or delete the checkpoints directory to start over.",
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
