"""``tune --train new-expert+router``: train the routers and only the expert that ``mix --add-expert`` added.

transformers 5 keeps a layer's routed experts in stacked parameters ([E, 2I, H] gate/up and
[E, H, I] down), so "one expert" is one slice of each. Those parameters train with a gradient
hook that zeroes every other expert's slice; AdamW then leaves those slices exactly as they were
(zero gradient: zero first and second moments, zero update), provided weight decay does not
touch them, so the stacked parameters are kept out of weight decay (the new expert trains
without it; the routers decay as usual). Per-expert parameters (``experts.<i>.``) train only for the new index.
FSDP2 shards the stacked parameters along the expert axis, so this mode runs unsharded (DDP).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from moekit.errors import InvalidOptionError

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def added_expert_index(model_dir: Path) -> int:
    """The index of the expert ``mix --add-expert`` added (from the MoE's provenance); InvalidOptionError if none
    was."""
    from moekit.provenance import recorded

    added = recorded(model_dir, "added")  # a tuned grown model's provenance wraps the grown one's
    if not isinstance(added, dict) or not isinstance(added.get("expert_index"), int):
        raise InvalidOptionError(
            f"--train new-expert+router trains the expert that `mix --add-expert` added, and {model_dir} has none.",
            "Use --train router (or all), or grow the MoE first: moekit mix RUN_DIR --add-expert NAME.",
        )
    return int(added["expert_index"])


def is_stacked_experts(name: str) -> bool:
    """Whether a parameter holds every routed expert of a layer (transformers 5's
    ``experts.gate_up_proj``/``down_proj``)."""
    return ".experts." in f"{name}." and _PER_EXPERT.search(f"{name}.") is None


def new_expert_only(
    model: torch.nn.Module, index: int, shard: str
) -> tuple[Callable[[str], bool], Callable[[str], bool], list[Any]]:
    """(trainable-expert predicate, no-decay predicate, gradient-hook handles) for training expert ``index`` alone."""
    if shard != "none":
        raise InvalidOptionError(
            "--train new-expert+router runs unsharded: FSDP2 splits the stacked expert parameters along the "
            "expert axis.",
            "Drop --shard fsdp (several processes still work, as DDP).",
        )
    handles = []
    for name, param in model.named_parameters():
        if is_stacked_experts(name):
            if param.shape[0] <= index:
                raise InvalidOptionError(
                    f"{name} holds {param.shape[0]} experts; the added expert is number {index}.",
                    "The provenance does not match the weights: grow the MoE again.",
                )
            keep = torch.zeros(param.shape[0], *([1] * (param.ndim - 1)), dtype=torch.bool)
            keep[index] = True
            # where, not a product: an inf gradient times 0 would be NaN in the frozen slices
            handles.append(
                param.register_hook(
                    lambda grad, keep=keep: torch.where(
                        keep.to(grad.device), grad, torch.zeros((), dtype=grad.dtype, device=grad.device)
                    )
                )
            )

    def trainable(name: str) -> bool:
        match = _PER_EXPERT.search(f"{name}.")
        return is_stacked_experts(name) or (match is not None and int(match.group(1)) == index)

    return trainable, is_stacked_experts, handles
