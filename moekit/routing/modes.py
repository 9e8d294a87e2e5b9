"""Training-time routing rules for ablations (docs/reference.md §3).

Each rule maps one router call's fp32 logits [N, E] to ``(weights, indices, mask, stats)`` that
the model's own expert implementation consumes: ``indices`` [N, s] expert slots per token,
``weights`` [N, s] their gate values (0 for an unused slot) and ``mask`` [N, s] which slots are
real assignments (None: all of them). No decoder-only family runs these rules at inference: a
model tuned with one of them is saved with its configured routing (its router's top-k), which
the model card states.

Gate values follow the target family's convention: scores (softmax, or sigmoid for GLM-4.5)
renormalised over the chosen experts, times the family's ``routed_scaling_factor``; only Switch
keeps the raw probability (Fedus et al.) and soft routing the full distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

RoutingMode = Literal["topk", "switch", "soft", "noisy", "expert_choice", "hash", "sample_top1"]
ABLATION_MODES = ("switch", "soft", "noisy", "expert_choice", "hash", "sample_top1")
KNUTH_MULTIPLIER = 2654435761  # multiplicative hash (Knuth): spreads consecutive token ids over experts


@dataclass
class Routed:
    """One router call under an ablation rule."""

    weights: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Each expert's score [N, E]: softmax probabilities, or sigmoid scores (not normalised)."""
    return logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)


def renormalised(scores_: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """The chosen experts' scores, renormalised to sum to one per token, times ``scale``."""
    chosen = scores_.gather(1, indices)
    return chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(1e-20) * scale


def switch(logits: torch.Tensor, scoring: str, capacity_factor: float) -> Routed:
    """Switch (Fedus et al. 2022): top-1, gate = the raw probability, capacity = tokens / E x factor.

    Tokens past an expert's capacity get gate 0: they skip the MoE and keep the residual.
    """
    experts = logits.shape[-1]
    weights, indices = scores(logits, scoring).max(dim=-1, keepdim=True)
    capacity = math.ceil(logits.shape[0] / experts * capacity_factor)
    position = F.one_hot(indices[:, 0], experts).cumsum(dim=0).gather(1, indices)
    keep = position <= capacity
    load = torch.bincount(indices[keep], minlength=experts).float()
    return Routed(
        weights * keep, indices, None, {"dropped": float((~keep).sum()), "capacity_use": float(load.mean() / capacity)}
    )


def soft(logits: torch.Tensor, scoring: str) -> Routed:
    """Soft routing: every expert, weighted by its normalised score (BTX's upper bound)."""
    probs = scores(logits, scoring)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    indices = torch.arange(logits.shape[-1], device=logits.device).expand(logits.shape[0], -1)
    return Routed(probs, indices)


def noisy_top_k(logits: torch.Tensor, noise_logits: torch.Tensor, top_k: int, scoring: str, scale: float) -> Routed:
    """Noisy top-k (Shazeer et al. 2017): logits + N(0, 1) x softplus(x W_noise), then top-k.

    ``noise_logits`` = x W_noise (learned; zeros at the start, so the noise std starts at
    softplus(0) = 0.69). Gate values are the family's renormalised scores of the noisy logits,
    so the router and W_noise both get gradients.
    """
    noisy = logits + torch.randn_like(logits) * F.softplus(noise_logits)
    indices = noisy.topk(top_k, dim=-1).indices
    return Routed(
        renormalised(scores(noisy, scoring), indices, scale),
        indices,
        None,
        {"noise_std": float(F.softplus(noise_logits.detach()).mean())},
    )


def expert_choice(logits: torch.Tensor, scoring: str, top_k: int, capacity_factor: float, scale: float) -> Routed:
    """Expert choice (Zhou et al. 2022): each expert takes its ``capacity`` highest-scoring tokens.

    capacity = ceil(N x top_k / E x factor), so factor 1 costs what top-k costs. A token's gate
    values are its scores for the experts that chose it, renormalised; a token no expert chose
    keeps the residual only. Balanced by construction, but not causal: a token's experts depend
    on the other tokens of the batch, later ones included, so it cannot decode as is.
    """
    tokens, experts = logits.shape
    probs = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    capacity = min(tokens, math.ceil(tokens * top_k / experts * capacity_factor))
    chosen_tokens = probs.T.topk(capacity, dim=-1).indices  # [E, capacity]
    # [N, E]: True where expert e chose token n
    mask = torch.zeros(experts, tokens, dtype=torch.bool, device=logits.device).scatter_(1, chosen_tokens, True).T
    gated = probs * mask
    weights = gated / gated.sum(dim=-1, keepdim=True).clamp_min(1e-20) * scale
    indices = torch.arange(experts, device=logits.device).expand(tokens, -1)
    unrouted = float((~mask.any(dim=-1)).sum())
    return Routed(
        weights,
        indices,
        mask,
        {
            "dropped": unrouted,
            "capacity_use": float(mask.sum() / (capacity * experts)),
            "experts_per_token": float(mask.sum() / tokens),
        },
    )


def hashed(token_ids: torch.Tensor, experts: int, top_k: int, scale: float) -> Routed:
    """Hash routing (Roller et al. 2021): a fixed function of the token id picks ``top_k`` distinct experts, equal
    weights.

    Expert j of a token is (h + j) mod E with h = (id x 2654435761 mod 2^32) mod E. Nothing is
    learned; it is the no-learning baseline.
    """
    first = (token_ids.reshape(-1).long() * KNUTH_MULTIPLIER % (1 << 32)) % experts
    indices = (first[:, None] + torch.arange(top_k, device=first.device)[None, :]) % experts
    weights = torch.full(indices.shape, scale / top_k, device=first.device)
    return Routed(weights, indices)


def sample_top1(logits: torch.Tensor, temperature: float, scale: float) -> Routed:
    """BTX's sample top-1: one expert drawn by Gumbel-max at ``temperature``; straight-through gate.

    The forward gate is exactly 1 (times ``scale``): the token gets the sampled expert's output.
    The gradient flows through the softmax of (logits + Gumbel noise) / temperature at that
    expert (the straight-through Gumbel-softmax estimator), so the router learns. The draw
    itself samples softmax(logits) at any temperature (argmax is scale-free); the temperature
    sets the bias/variance of that gradient, which is what the schedule anneals.
    """
    gumbel = -torch.empty_like(logits).exponential_().log()
    soft_choice = ((logits + gumbel) / temperature).softmax(dim=-1)
    indices = soft_choice.argmax(dim=-1, keepdim=True)
    picked = soft_choice.gather(1, indices)
    weights = (picked - picked.detach() + 1.0) * scale
    return Routed(weights, indices, None, {"temperature": float(temperature)})
