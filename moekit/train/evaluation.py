"""Held-out loss of causal LMs on packed blocks: per block (``eval``), and per domain across ranks (the training
loop)."""

from __future__ import annotations

import math

import torch

from moekit.config import LoopSettings
from moekit.train.engine import Engine


def block_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block in ``ids`` [B, T] (fp32), shape [B]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay printable."""
    return math.exp(min(loss, 50.0))


def evaluate(
    model: torch.nn.Module, eval_sets: dict[str, torch.Tensor], settings: LoopSettings, engine: Engine
) -> dict[str, float]:
    """Mean held-out loss per domain over the first ``eval_blocks`` blocks, split across ranks.

    Every rank runs the same number of forward passes (FSDP needs that): ranks with fewer real
    blocks re-run one and give it weight 0.
    """
    world, rank = engine.world, engine.rank
    results = {}
    model.eval()
    with torch.no_grad():
        for domain, blocks in eval_sets.items():
            blocks = blocks[: settings.eval_blocks]
            positions = torch.arange(rank, -(-len(blocks) // world) * world, world)
            weights = (positions < len(blocks)).float()
            totals = torch.zeros(2, device=engine.device)
            for index, weight in zip(positions.split(settings.batch_size), weights.split(settings.batch_size)):
                ids = blocks[index % len(blocks)].long().to(engine.device)
                with engine.autocast():
                    losses = block_losses(model, ids)
                totals += torch.stack([(losses * weight.to(losses.device)).sum(), weight.sum().to(losses.device)])
            totals = engine.sum(totals)
            results[domain] = float(totals[0] / totals[1])
    model.train()
    return results
