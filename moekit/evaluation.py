"""Held-out loss of causal LMs on packed blocks (used by the training loop and the demo)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def block_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each block in ``ids`` [B, T] (fp32), shape [B]."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)


def domain_losses(model_dir: Path, blocks: dict[str, torch.Tensor], batch: int = 8) -> dict[str, float]:
    """Mean held-out loss per domain of the model in ``model_dir`` (CPU, fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = {}
    with torch.no_grad():
        for domain, domain_blocks in blocks.items():
            losses = torch.cat([block_losses(model, chunk.long()) for chunk in domain_blocks.split(batch)])
            results[domain] = float(losses.mean())
    return results


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay printable."""
    return math.exp(min(loss, 50.0))
