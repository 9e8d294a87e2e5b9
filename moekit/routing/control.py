"""Control and observe the routers of a transformers MoE during training.

Routers are found generically: every transformers MoE declares the module class whose output
is recorded as ``router_logits``; those modules return ``(logits, top_k_weights, top_k_index)``
and the model's own expert implementation consumes the last two, so moekit never reimplements
expert compute. In ``topk`` mode the routers run unchanged and a forward hook only records
their outputs. ``switch`` (top-1 with a capacity factor; overflow tokens get gate 0, i.e. skip
the expert and keep the residual) and ``soft`` (every expert, softmax weights) replace the
router's forward for training ablations; saved models keep their configured routing.

Statistics cost one bincount per layer per micro-batch; the tensors that the balancing losses
need (logits, weights) are the router's own outputs, kept for that micro-batch only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from moekit.errors import MoekitError
from moekit.routing import balance

RoutingMode = Literal["topk", "switch", "soft"]


@dataclass
class LayerRecord:
    """One router call: fp32 logits [N, E], gate weights [N, k], expert indices [N, k]."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    dropped: int = 0


def find_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The router modules of a transformers MoE, in layer order; MoekitError for dense models."""
    recorders = [getattr(m, "_can_record_outputs", None) for m in (model, getattr(model, "model", None))]
    router_class = next((r["router_logits"].target_class for r in recorders if r and "router_logits" in r), None)
    routers = [(n, m) for n, m in model.named_modules() if router_class is not None and isinstance(m, router_class)]
    if not routers:
        raise MoekitError(
            f"{type(model).__name__} has no routers: it is not a Mixture-of-Experts model.",
            "Give the MoE that `moekit mix` wrote.",
        )
    return routers


class RoutingController:
    """Records every router call of a forward pass, optionally changing the routing rule."""

    def __init__(self, model: torch.nn.Module, mode: RoutingMode = "topk", capacity_factor: float = 1.5) -> None:
        self.routers = find_routers(model)
        self.mode, self.capacity_factor = mode, capacity_factor
        self.num_experts = int(self.routers[0][1].weight.shape[0])
        self.records: list[LayerRecord | None] = [None] * len(self.routers)
        self._handles = []
        for layer, (_, router) in enumerate(self.routers):
            if mode == "topk":
                self._handles.append(router.register_forward_hook(self._recording_hook(layer)))
            else:
                router.forward = self._replacement(layer, router)  # instance attribute shadows the class method

    def _recording_hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            logits, weights, indices = output[:3]
            self.records[layer] = LayerRecord(logits.float(), weights, indices)

        return hook

    def _replacement(self, layer: int, router: torch.nn.Module) -> Any:
        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            hidden = hidden_states.reshape(-1, router.weight.shape[1])
            logits = F.linear(hidden, router.weight).float()  # router math in fp32
            probs = logits.softmax(dim=-1)
            if self.mode == "soft":
                indices = torch.arange(self.num_experts, device=hidden.device).expand(hidden.shape[0], -1)
                weights, dropped = probs, 0
            else:  # switch: top-1, gate = raw probability (so the router gets gradients), capacity drop
                weights, indices = probs.max(dim=-1, keepdim=True)
                capacity = math.ceil(hidden.shape[0] / self.num_experts * self.capacity_factor)
                position = F.one_hot(indices[:, 0], self.num_experts).cumsum(dim=0).gather(1, indices)
                keep = position <= capacity
                weights, dropped = weights * keep, int((~keep).sum())
            self.records[layer] = LayerRecord(logits, weights, indices, dropped)
            return logits.to(hidden.dtype), weights.to(hidden.dtype), indices

        return forward

    def collected(self) -> list[LayerRecord]:
        """This forward pass's records, one per layer; error if a router did not run."""
        if any(r is None for r in self.records):
            raise RuntimeError("a router did not run in this forward pass")
        return [r for r in self.records if r is not None]

    def clear(self) -> None:
        """Forget the last forward pass (call before the next one)."""
        self.records = [None] * len(self.routers)

    def counts(self) -> torch.Tensor:
        """Assignment counts of the last forward pass, [layers, E]."""
        return torch.stack([balance.assignment_counts(r.indices, self.num_experts) for r in self.collected()])

    @contextlib.contextmanager
    def native_routing(self) -> Iterator[None]:
        """Temporarily route with the model's own routers (e.g. to evaluate what will be saved)."""
        replaced = {id(r): r.__dict__.pop("forward") for _, r in self.routers if "forward" in r.__dict__}
        handles = [r.register_forward_hook(self._recording_hook(i)) for i, (_, r) in enumerate(self.routers)] if replaced else []
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for _, router in self.routers:
                if id(router) in replaced:
                    router.forward = replaced[id(router)]

    def remove(self) -> None:
        """Detach hooks and restore the routers' own forward methods."""
        for handle in self._handles:
            handle.remove()
        for _, router in self.routers:
            router.__dict__.pop("forward", None)
