"""Router initialisation.

Two known failure modes shape these choices:

* **All-zero routers**: every logit ties, ``topk`` then picks the same experts (the lowest
  indices) for every token, and their gradients are identical: experts never separate.
* **N(0, 1) routers** (or any large scale): logits of size ~sqrt(hidden) saturate the softmax,
  so the initial routing is effectively random and hard, and gradients through the gate vanish.

``random_router`` draws N(0, std^2) with a small std (the model's ``initializer_range``, 0.02, by
default). ``centroid_router`` sets expert e's row to the mean router input of its own domain,
centred by the overall mean, then scales all rows so that the mean top-1 probability lies a set
fraction of the way between uniform (1/E) and saturated (1). Router math runs in fp32.
"""

from __future__ import annotations

import torch


def random_router(num_experts: int, hidden: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """A [num_experts, hidden] fp32 router drawn from N(0, std^2); std must be > 0."""
    if std <= 0:
        raise ValueError("router std must be positive")
    return torch.randn(num_experts, hidden, generator=generator, dtype=torch.float32) * std


def mean_top1_probability(logits: torch.Tensor) -> float:
    """Mean over tokens of the largest softmax probability (1/E = uniform, 1 = saturated)."""
    return float(torch.softmax(logits.float(), dim=-1).max(dim=-1).values.mean())


def scale_for_sharpness(directions: torch.Tensor, inputs: torch.Tensor, sharpness: float) -> float:
    """Find s > 0 so that routing ``inputs`` with ``s * directions`` has the target top-1 probability.

    The target is ``1/E + sharpness * (1 - 1/E)``; the mean top-1 probability grows with s, so a
    bisection on log(s) finds it. ``sharpness`` in (0, 1): 0 = uniform, 1 = saturated.
    """
    num_experts = directions.shape[0]
    target = 1.0 / num_experts + sharpness * (1.0 - 1.0 / num_experts)
    base_logits = inputs.float() @ directions.float().T
    if float(base_logits.abs().max()) == 0.0:
        raise ValueError("router directions are orthogonal to every input; cannot scale")
    low, high = -30.0, 30.0  # bounds on log(s)
    for _ in range(80):
        mid = (low + high) / 2
        if mean_top1_probability(base_logits * torch.exp(torch.tensor(mid))) < target:
            low = mid
        else:
            high = mid
    return float(torch.exp(torch.tensor((low + high) / 2)))


def centroid_router(
    domain_means: torch.Tensor, overall_mean: torch.Tensor, inputs: torch.Tensor, sharpness: float
) -> torch.Tensor:
    """Router rows from per-expert mean inputs [E, H], centred and scaled to the target sharpness.

    ``domain_means[e]`` is the mean router input of expert e's domain (the overall mean for a
    generalist seed expert, whose centred row is then zero: it wins where no domain expert is
    clearly preferred). ``inputs`` [N, H] are calibration router inputs used to pick the scale.
    """
    directions = domain_means.float() - overall_mean.float()
    return directions * scale_for_sharpness(directions, inputs, sharpness)
