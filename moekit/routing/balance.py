"""Load-balancing losses and expert-load metrics (docs/reference.md §3 and §4).

Conventions, stated once because papers and libraries differ:

* ``f`` is the share of top-k *assignments* that go to each expert (it sums to 1), so the
  Switch loss ``E * sum_i f_i P_i`` is 1.0 at perfect balance for any k. transformers'
  ``load_balancing_loss_func`` normalises by tokens instead and equals k at balance.
* The BTX variant replaces ``f`` by ``u``, the mean sparse gate value per expert (differentiable).
* The router z-loss is ``mean_tokens(logsumexp(logits)^2)`` (ST-MoE).
* Losses are computed per layer and averaged over layers.
"""

from __future__ import annotations

import math

import torch


def assignment_counts(indices: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k assignments per expert, as a float [E] vector (only the slots where ``mask`` is true, if given)."""
    chosen = indices.reshape(-1) if mask is None else indices.reshape(-1)[mask.reshape(-1)]
    return torch.bincount(chosen, minlength=num_experts).float()


def router_scores(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """Per-token expert probabilities [N, E] from router logits, for the balancing losses.

    ``softmax``: the softmax over experts. ``sigmoid`` (GLM-4.5, DeepSeek-V3): each expert's
    sigmoid score, normalised to sum to one over experts (DeepSeek-V3's s').
    """
    if scoring == "sigmoid":
        scores = logits.float().sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits.float().softmax(dim=-1)


def sequence_loss(indices: torch.Tensor, scores: torch.Tensor, sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, ``sum_i f_i P_i`` per sequence, averaged over sequences.

    ``indices`` [N, k] (N = sequences x T tokens, sequence-major), ``scores`` [N, E] normalised
    scores. f_i = E / (k T) x (tokens of the sequence that select i); P_i = the mean score of i
    over the sequence. 1.0 at perfect balance, like :func:`switch_loss`. It complements the
    selection bias: it keeps any one sequence from piling onto few experts.
    """
    experts, k = scores.shape[-1], indices.shape[-1]
    tokens = indices.shape[0] // sequences
    chosen = torch.zeros(sequences, tokens, experts, device=scores.device).scatter_(
        2, indices.reshape(sequences, tokens, k), 1.0
    )
    f = chosen.sum(dim=1) * (experts / (k * tokens))
    p = scores.reshape(sequences, tokens, experts).mean(dim=1)
    return (f.detach() * p).sum(dim=-1).mean()


def switch_loss(counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``E * sum_i f_i P_i`` with f from (detached) counts and P the mean router probability [E]."""
    f = counts / counts.sum().clamp_min(1)
    return probs.shape[-1] * (f.detach() * probs).sum()


def btx_loss(gate_means: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """BTX's variant: ``E * sum_i u_i P_i``, u = mean sparse gate value per expert."""
    return probs.shape[-1] * (gate_means * probs).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sparse_gate_means(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean over tokens of each expert's gate value (0 where not selected), [E]."""
    dense = torch.zeros(indices.shape[0], num_experts, dtype=weights.dtype, device=weights.device)
    return dense.scatter(1, indices, weights).float().mean(dim=0)


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Load statistics of one layer's assignment counts [E] (OLMo-core / Wang et al. definitions)."""
    counts = counts.float()
    mean = counts.mean().clamp_min(1e-12)
    share = counts / counts.sum().clamp_min(1e-12)
    entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
    return {
        "load_imbalance": float(counts.max() / mean),
        "maxvio": float((counts.max() - mean) / mean),
        "cv": float(counts.std(unbiased=False) / mean),
        "entropy": entropy,
        "effective_experts": math.exp(entropy),
        "dead_experts": int((counts == 0).sum()),
    }


def update_selection_bias(
    bias: torch.Tensor, counts: torch.Tensor, rate: float, proportional: bool = False
) -> torch.Tensor:
    """Loss-free balancing update (Wang et al. 2024; DeepSeek-V3) of a selection bias [E].

    Under-loaded experts (count below the mean) get a larger bias, over-loaded ones a smaller:
    ``b += rate * sign(mean - c)``, or with ``proportional`` ``b += rate * (mean - c) / mean``
    (better with a softmax gate). The bias affects which experts are selected, not gate values.
    """
    mean = counts.float().mean().clamp_min(1e-12)
    gap = mean - counts.float()
    step = gap / mean if proportional else torch.sign(gap)
    return bias + rate * step
