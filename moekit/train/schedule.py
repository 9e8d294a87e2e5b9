"""Pieces of the training loop that are pure functions of the step: the step budget, the learning rate, the data order.

Making the data order and the learning rate functions of the step number (not of iterator or
scheduler objects) is what makes resume exact and data-parallel runs equal to single-process
ones: a resumed run recomputes both from the step it loads, and every rank derives its share of
the global batch from the same permutation.
"""

from __future__ import annotations

import math

import torch

from moekit.config import LoopSettings


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
