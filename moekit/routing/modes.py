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

RoutingMode = Literal["topk", "switch", "soft", "noisy", "expert_choice", "hash", "sample_top1", "sbase"]
ABLATION_MODES = ("switch", "soft", "noisy", "expert_choice", "hash", "sample_top1", "sbase")
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


SINKHORN_ITERATIONS = 10  # S-BASE: Sinkhorn iterations, the temperature annealed from 1 to SINKHORN_FINAL_TEMPERATURE
SINKHORN_FINAL_TEMPERATURE = 0.05
BALANCE_CORRECTIONS = 20  # S-BASE: count-correction steps on the Sinkhorn offsets


def sinkhorn_offsets(logits: torch.Tensor, top_k: int, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Per-expert offsets [E] (logit units) that balance top-k of ``logits + offsets`` over the batch.

    Entropic optimal transport in the log domain (Sinkhorn): find token duals a [N] and expert
    duals b [E] such that exp((logits + a + b) / t) has row sums k and column sums N k / E.
    The temperature t is annealed geometrically from 1 to 0.05 ("epsilon scaling"), so the plan
    approaches the linear assignment of BASE layers while every step stays well conditioned.
    The expert duals are the offsets: a token's balanced scores are its logits plus them.
    """
    tokens, experts = logits.shape
    token_dual = torch.zeros(tokens, device=logits.device)
    expert_dual = torch.zeros(experts, device=logits.device)
    column, row = math.log(tokens * top_k / experts), math.log(top_k)
    for temperature in torch.logspace(0.0, math.log10(SINKHORN_FINAL_TEMPERATURE), iterations).tolist():
        expert_dual = temperature * (column - torch.logsumexp((logits + token_dual[:, None]) / temperature, dim=0))
        token_dual = temperature * (row - torch.logsumexp((logits + expert_dual[None, :]) / temperature, dim=1))
    return expert_dual


def corrected_offsets(logits: torch.Tensor, offsets: torch.Tensor, top_k: int, steps: int) -> torch.Tensor:
    """Move ``offsets`` until top-k of ``logits + offsets`` gives each expert N k / E tokens (approximately).

    Sinkhorn balances the transport plan, but the plan of top-k > 1 lets a token put more than one
    unit on one expert, which top-k cannot; under a skewed router that leaves up to ~10% imbalance
    (E = 16, k = 2). Each step lowers the offset of an over-full expert and raises an under-full
    one's, in proportion to its relative excess, with a decaying step of the logits' spread.
    """
    target = logits.shape[0] * top_k / logits.shape[1]
    spread = float(logits.std()) or 1.0
    for step in range(steps):
        counts = torch.bincount((logits + offsets).topk(top_k, dim=-1).indices.reshape(-1), minlength=logits.shape[1])
        offsets = offsets - 0.5 * spread * (counts.float() - target) / target / math.sqrt(1 + step)
    return offsets


def sbase(logits: torch.Tensor, scoring: str, top_k: int, scale: float) -> Routed:
    """S-BASE (Clark et al. 2022): Sinkhorn-balanced top-k assignment while training.

    Experts are chosen by top-k of the balanced scores (logits + per-expert offsets from a few
    Sinkhorn iterations, then count corrections); gate values are the family's renormalised
    scores of the raw logits at those experts, so the router learns from them. The selection
    carries no gradient (as in BASE layers) and needs no balancing loss. At inference the model
    routes by its own top-k.
    """
    detached = logits.detach().float()
    offsets = corrected_offsets(detached, sinkhorn_offsets(detached, top_k), top_k, BALANCE_CORRECTIONS)
    indices = (detached + offsets).topk(top_k, dim=-1).indices
    counts = torch.bincount(indices.reshape(-1), minlength=logits.shape[1]).float()
    target = logits.shape[0] * top_k / logits.shape[1]
    return Routed(
        renormalised(scores(logits, scoring), indices, scale),
        indices,
        None,
        {"sbase_imbalance": float((counts / target - 1).abs().max())},
    )


def group_limited_top_k(scores_for_choice: torch.Tensor, top_k: int, groups: int, top_groups: int) -> torch.Tensor:
    """Group-limited top-k (DeepSeek-V3, GLM-4.5): expert indices [N, k] chosen within the best groups.

    The E experts form ``groups`` consecutive groups; a group's score is the sum of its two best
    ``scores_for_choice`` (scores + selection bias); the ``top_groups`` best groups stay, every
    other expert is masked to -inf (not 0: biased scores may be negative), then top-k.
    """
    tokens, experts = scores_for_choice.shape
    grouped = scores_for_choice.view(tokens, groups, experts // groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(top_groups, dim=-1).indices, True)
    masked = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(tokens, experts)
    return masked.topk(top_k, dim=-1).indices
