"""Self-contrast decoding of a Mixture-of-Experts model (SCMoE, Shi et al. 2024, arXiv 2405.14507).

The same MoE is run twice per decoding step: with its own top-k routing (the *strong* pass) and
with a *weak* routing that sends each token only to its k-th ranked expert. The next-token
logits are contrasted,

    z = (1 + beta) * z_strong - beta * z_weak,

over the tokens the strong pass finds plausible, z_strong >= log(alpha) + max z_strong (every
other token gets -inf). The authors use alpha = 0.1, beta = 0.5 and k = 2 for Mixtral.

Numerics: the formula is applied to logits. Contrasting log-probabilities instead only adds a
per-row constant ((1 + beta) and beta times each pass's log-partition), which changes neither the
argmax nor the softmax, and the plausibility test is the same on logits and on log-probabilities.
The weak pass gives the k-th ranked expert the whole gate (1 x the family's routed scale), as the
authors' code does. It ranks the experts the model's own router chose (selection bias and group
limits included) by their gate weights, so rank k exists only for models that route to k or more.

No weights are copied: the weak pass swaps each router's forward for the length of one call and
keeps its own KV cache, so every step costs one extra forward of the new token only.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch

from moekit.errors import InvalidOptionError
from moekit.routing.control import find_routers, router_top_k

DEFAULT_BETA, DEFAULT_ALPHA, DEFAULT_RANK = 0.5, 0.1, 2  # the authors' settings for Mixtral (top-2)


def contrast_logits(strong: torch.Tensor, weak: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SCMoE's next-token scores from the strong and weak passes' logits [B, V] (implausible tokens -inf)."""
    strong, weak = strong.float(), weak.float()
    plausible = strong >= strong.max(dim=-1, keepdim=True).values + math.log(alpha)
    return torch.where(plausible, (1.0 + beta) * strong - beta * weak, torch.full_like(strong, -math.inf))


def check_contrast_applies(model: torch.nn.Module, rank: int) -> None:
    """Refuse SCMoE where it does not apply: a dense model, or a rank beyond the experts a token is routed to."""
    routers = find_routers(model)  # MoekitError for a dense model
    top_k = router_top_k(model, routers[0][1])
    if rank < 2:
        raise InvalidOptionError(
            f"--scmoe-rank {rank}: the weak routing must use a lower-ranked expert than the strong one.",
            "Use a rank of 2 or more (2 is the authors' choice for top-2 models).",
        )
    if rank > top_k:
        raise InvalidOptionError(
            f"--scmoe-rank {rank} needs the model to rank at least {rank} experts per token, but it routes each "
            f"token to {top_k}.",
            (f"Use --scmoe-rank 2..{top_k}" if top_k > 2 else "Use --scmoe-rank 2")
            if top_k >= 2
            else "SCMoE needs a model with top-k >= 2 (a top-1 model has no weaker choice).",
        )


@contextlib.contextmanager
def rank_routing(model: torch.nn.Module, rank: int) -> Iterator[None]:
    """Inside the block every router sends each token only to its ``rank``-th ranked expert (1-based), gate 1 x
    scale."""
    routers = [router for _, router in find_routers(model)]

    def weak_forward(router: torch.nn.Module, native: Any) -> Any:
        scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            logits, weights, indices = native(hidden_states, *args, **kwargs)[:3]
            # Rank the router's own choices by their gate weight (some families return top-k unsorted).
            order = weights.float().argsort(dim=-1, descending=True, stable=True)
            chosen = indices.gather(-1, order[..., rank - 1 : rank])
            return logits, torch.full(chosen.shape, scale, dtype=weights.dtype, device=weights.device), chosen

        return forward

    for router in routers:
        router.forward = weak_forward(router, router.forward)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for router in routers:
            router.__dict__.pop("forward", None)


class SelfContrast:
    """A transformers logits processor: SCMoE's contrast of each step's logits with a weak-routing pass.

    Expects unpadded batches (every row the same length), as ``moekit generate`` gives it; keeps
    the weak pass's KV cache across calls, so create one per ``generate`` call.
    """

    def __init__(
        self, model: torch.nn.Module, beta: float = DEFAULT_BETA, alpha: float = DEFAULT_ALPHA, rank: int = DEFAULT_RANK
    ) -> None:
        check_contrast_applies(model, rank)
        if beta < 0 or not 0 < alpha <= 1:
            raise InvalidOptionError(
                f"SCMoE needs beta >= 0 and 0 < alpha <= 1 (got beta {beta}, alpha {alpha}).",
                "The authors use --scmoe-beta 0.5 --scmoe-alpha 0.1.",
            )
        self.model, self.beta, self.alpha, self.rank = model, beta, alpha, rank
        self.cache: Any = None
        # transformers renamed forward's past_key_values to cache (5.2x); take whichever this version has
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.seen = 0  # tokens of each row already in the weak pass's cache

    def weak_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The weak pass's next-token logits [B, V], feeding only the tokens it has not seen yet."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        new = input_ids[:, self.seen :]
        with torch.no_grad(), rank_routing(self.model, self.rank):
            out = self.model(input_ids=new, use_cache=True, **{self.cache_keyword: self.cache})
        self.seen = input_ids.shape[1]
        return out.logits[:, -1, :]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers' LogitsProcessor interface: (ids so far [B, T], next-token scores [B, V]) -> new scores."""
        weak = self.weak_logits(input_ids)
        return contrast_logits(scores, weak, self.beta, self.alpha).to(scores.dtype)
