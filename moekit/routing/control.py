"""Control and observe the routers of a transformers MoE during training.

Routers are found generically: every transformers MoE declares the module class whose output
is recorded as ``router_logits``; those modules return ``(logits, top_k_weights, top_k_index)``
and the model's own expert implementation consumes the last two, so moekit never reimplements
expert compute. In ``topk`` mode the routers run unchanged (selection bias included) and a
forward hook only records their outputs. The ablation modes of :mod:`moekit.routing.modes`
replace the router's forward while training; evaluation and saved models keep the configured
routing.

Statistics cost one bincount per layer per micro-batch; the tensors that the balancing losses
need (logits, weights) are the router's own outputs, kept for that micro-batch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moekit.errors import MoekitError
from moekit.routing import balance, modes
from moekit.routing.modes import RoutingMode

NOISE_PARAMETER = "moekit_noise_weight"  # noisy top-k's W_noise, registered on each router while tuning (never saved)


@dataclass
class LayerRecord:
    """One router call: fp32 logits [N, E], gate weights [N, s], expert indices [N, s], real slots [N, s] (None:
    all)."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def counts(self, num_experts: int) -> torch.Tensor:
        """Assignments per expert [E] of this call."""
        return balance.assignment_counts(self.indices, num_experts, self.mask)


ATTENTION_ROUTERS = "attention_router_logits"  # the recorder key of moekit_moe's attention-expert routers


def find_routers(model: torch.nn.Module, key: str = "router_logits") -> list[tuple[str, torch.nn.Module]]:
    """The router modules of a transformers MoE, in layer order; MoekitError for dense models.

    ``key``: the output the routers are recorded as (``router_logits``: the FFN experts' routers).
    """
    routers = _recorded_modules(model, key)
    if not routers:
        raise MoekitError(
            f"{type(model).__name__} has no routers: it is not a Mixture-of-Experts model.",
            "Give the MoE that `moekit mix` wrote.",
        )
    return routers


def find_attention_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The routers of a model's attention experts (moekit_moe, ``mix --attention-experts``), in layer order; [] if
    none."""
    return _recorded_modules(model, ATTENTION_ROUTERS)


def _recorded_modules(model: torch.nn.Module, key: str) -> list[tuple[str, torch.nn.Module]]:
    recorders = [getattr(m, "_can_record_outputs", None) for m in (model, getattr(model, "model", None))]
    router_class = next((r[key].target_class for r in recorders if r and key in r), None)
    return [(n, m) for n, m in model.named_modules() if router_class is not None and isinstance(m, router_class)]


def router_top_k(model: torch.nn.Module, router: torch.nn.Module) -> int:
    """How many experts ``router`` sends each token to (its own ``top_k``, else the config's)."""
    return int(getattr(router, "top_k", None) or getattr(model.config, "num_experts_per_tok", 1))


@dataclass(frozen=True)
class RoutingSettings:
    """How routers route while training (ablation modes; ``topk`` is the model's own rule)."""

    mode: RoutingMode = "topk"
    capacity_factor: float = 1.5  # switch: capacity = tokens / E x this; expert_choice: x top_k
    scoring: str = "softmax"  # the family's score function (moekit.arch.router_scoring)
    temperature: tuple[float, float] = (1.0, 0.5)  # sample_top1: start and end temperature, linear over training
    jitter: float = 0.0  # multiply each router's input by U(1 - jitter, 1 + jitter) while training (0: off)


class RoutingController:
    """Records every router call of a forward pass, optionally changing the routing rule."""

    def __init__(
        self,
        model: torch.nn.Module,
        mode: RoutingMode = "topk",
        capacity_factor: float = 1.5,
        settings: RoutingSettings | None = None,
        routers: list[tuple[str, torch.nn.Module]] | None = None,
    ) -> None:
        self.settings = settings or RoutingSettings(mode, capacity_factor)
        self.routers = routers if routers is not None else find_routers(model)
        self.mode, self.capacity_factor = self.settings.mode, self.settings.capacity_factor
        self.num_experts = int(self.routers[0][1].weight.shape[0])
        self.top_k = router_top_k(model, self.routers[0][1])
        self.records: list[LayerRecord | None] = [None] * len(self.routers)
        self.token_ids: torch.Tensor | None = None  # hash routing: the ids of the batch being routed
        self.progress = 0.0  # share of training done (sample_top1's temperature schedule)
        self._handles = []
        for layer, (_, router) in enumerate(self.routers):
            if self.mode == "topk":
                self._handles.append(router.register_forward_hook(self._recording_hook(layer)))
            else:
                if self.mode == "noisy":
                    # Shazeer et al.: W_noise starts at zero
                    noise = torch.zeros_like(router.weight, dtype=torch.float32)
                    router.register_parameter(NOISE_PARAMETER, torch.nn.Parameter(noise))
                router.forward = self._replacement(layer, router)  # instance attribute shadows the class method
            if self.settings.jitter > 0:
                self._handles.append(router.register_forward_pre_hook(self._jitter_hook, with_kwargs=True))

    def _jitter_hook(self, router: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Switch's router jitter: the router's input times U(1 - eps, 1 + eps), in training only.

        Only the router sees the noise (a pre-hook of the router module): the experts get the
        unperturbed hidden states, unlike transformers' Mixtral ``router_jitter_noise``, which
        also multiplies the experts' input.
        """
        if not router.training:
            return None
        eps = self.settings.jitter
        if args:
            hidden = args[0]
            return (hidden * torch.empty_like(hidden).uniform_(1.0 - eps, 1.0 + eps), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden * torch.empty_like(hidden).uniform_(1.0 - eps, 1.0 + eps)}

    def _recording_hook(self, layer: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            logits, weights, indices = output[:3]
            self.records[layer] = LayerRecord(logits.float(), weights, indices)

        return hook

    def temperature(self) -> float:
        """sample_top1's current temperature (linear from start to end over training)."""
        start, end = self.settings.temperature
        return start + (end - start) * min(1.0, max(0.0, self.progress))

    def _route(self, logits: torch.Tensor, hidden: torch.Tensor, router: torch.nn.Module) -> modes.Routed:
        settings = self.settings
        scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
        if self.mode == "soft":
            return modes.soft(logits, settings.scoring)
        if self.mode == "switch":
            return modes.switch(logits, settings.scoring, settings.capacity_factor)
        if self.mode == "noisy":
            noise_logits = F.linear(hidden.float(), getattr(router, NOISE_PARAMETER).float())
            return modes.noisy_top_k(logits, noise_logits, self.top_k, settings.scoring, scale)
        if self.mode == "expert_choice":
            return modes.expert_choice(logits, settings.scoring, self.top_k, settings.capacity_factor, scale)
        if self.mode == "sbase":
            return modes.sbase(logits, settings.scoring, self.top_k, scale)
        if self.mode == "hash":
            if self.token_ids is None or self.token_ids.numel() != logits.shape[0]:
                raise RuntimeError("hash routing needs the token ids of the batch (set controller.token_ids)")
            return modes.hashed(self.token_ids.to(logits.device), self.num_experts, self.top_k, scale)
        return modes.sample_top1(logits, self.temperature(), scale)

    def _replacement(self, layer: int, router: torch.nn.Module) -> Any:
        def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            hidden = hidden_states.reshape(-1, router.weight.shape[1])
            logits = F.linear(hidden.float(), router.weight.float())  # router math in fp32
            routed = self._route(logits, hidden, router)
            self.records[layer] = LayerRecord(logits, routed.weights, routed.indices, routed.mask, routed.stats)
            return logits.to(hidden.dtype), routed.weights.to(hidden.dtype), routed.indices

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
        return torch.stack([r.counts(self.num_experts) for r in self.collected()])

    @contextlib.contextmanager
    def counting(self) -> Iterator[torch.Tensor]:
        """Accumulate the assignment counts [layers, E] of every forward pass inside the block (e.g. an evaluation)."""
        total = torch.zeros(len(self.routers), self.num_experts)

        def adder(layer: int) -> Any:
            def hook(_module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
                total[layer] += balance.assignment_counts(output[2], self.num_experts).cpu()

            return hook

        handles = [router.register_forward_hook(adder(i)) for i, (_, router) in enumerate(self.routers)]
        try:
            yield total
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def native_routing(self) -> Iterator[None]:
        """Temporarily route with the model's own routers (e.g. to evaluate what will be saved)."""
        replaced = {id(r): r.__dict__.pop("forward") for _, r in self.routers if "forward" in r.__dict__}
        handles = (
            [r.register_forward_hook(self._recording_hook(i)) for i, (_, r) in enumerate(self.routers)]
            if replaced
            else []
        )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for _, router in self.routers:
                if id(router) in replaced:
                    router.forward = replaced[id(router)]

    def remove(self) -> None:
        """Detach hooks, restore the routers' own forward methods and drop training-only parameters."""
        for handle in self._handles:
            handle.remove()
        for _, router in self.routers:
            router.__dict__.pop("forward", None)
            if NOISE_PARAMETER in router._parameters:
                del router._parameters[NOISE_PARAMETER]


def is_training_only(name: str) -> bool:
    """Whether a state-dict key is a parameter moekit adds for training only (never saved with the model)."""
    return name.endswith(f".{NOISE_PARAMETER}")
