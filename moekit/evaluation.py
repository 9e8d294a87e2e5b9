"""Held-out loss of causal LMs on packed blocks (used by the training loop and ``eval``)."""

from __future__ import annotations

import math

import torch


def block_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block in ``ids`` [B, T] (fp32), shape [B]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay printable."""
    return math.exp(min(loss, 50.0))
