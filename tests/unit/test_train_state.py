"""Step-derived schedule pieces: learning rate, data order, step budget."""

import pytest
import torch

from moekit.config import LoopSettings
from moekit.train.schedule import BlockSchedule, learning_rate, total_steps


def test_warmup_then_cosine_to_the_floor():
    settings = LoopSettings(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    rates = [learning_rate(s, settings, 100) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # non-increasing after warmup
    assert rates[-1] == pytest.approx(1e-4, rel=0.05) and min(rates[10:]) >= 1e-4 - 1e-12


def test_default_warmup_is_btx_capped():
    settings = LoopSettings(max_steps=2000, lr=1.0)
    assert learning_rate(99, settings, 2000) == pytest.approx(1.0)  # 100 warmup steps
    short = LoopSettings(max_steps=30, lr=1.0)
    assert learning_rate(2, short, 30) == pytest.approx(1.0)  # 10% of 30 = 3 steps


def test_max_tokens_budget():
    assert total_steps(LoopSettings(max_tokens=1000), tokens_per_step=300) == 4
    assert total_steps(LoopSettings(max_steps=7), tokens_per_step=300) == 7


def test_ranks_split_the_single_process_batch_exactly():
    single = BlockSchedule(num_blocks=37, micro=4, accum=2, world=1, seed=3)
    double = BlockSchedule(num_blocks=37, micro=2, accum=2, world=2, seed=3)
    for step in range(12):  # crosses several epochs of 37 blocks
        one = torch.cat([single.indices(step, m, 0) for m in range(2)])
        two = torch.cat([double.indices(step, m, r) for m in range(2) for r in range(2)])
        assert sorted(one.tolist()) == sorted(two.tolist())


def test_every_block_once_per_epoch():
    schedule = BlockSchedule(num_blocks=24, micro=3, accum=1, world=1, seed=0)
    seen = torch.cat([schedule.indices(step, 0, 0) for step in range(8)])
    assert sorted(seen.tolist()) == list(range(24))
