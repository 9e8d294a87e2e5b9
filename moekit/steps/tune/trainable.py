"""Which parameters ``tune --train`` trains, and the selection biases ``--balance bias`` learns instead."""

from __future__ import annotations

from typing import Any

import torch

from moekit.arch import selection_bias_targets
from moekit.config import TuneConfig
from moekit.errors import InvalidOptionError, UnsupportedArchitectureError
from moekit.routing.bias import SelectionBias, find_selection_biases
from moekit.routing.control import RoutingController
from moekit.steps.tune.hypermoe import is_hypermoe_parameter


def is_routed_expert(name: str) -> bool:
    """Whether a parameter belongs to the routed experts (transformers 5 keeps them in an ``experts`` module;
    a Qwen2-MoE ``shared_expert`` is not one of them)."""
    return ".experts." in f"{name}."


def trainable_predicate(
    cfg: TuneConfig,
    controller: RoutingController,
    frozen: set[str] = frozenset(),
    new_expert: Any = None,
    attention_routers: list[tuple[str, Any]] = (),  # type: ignore[assignment]
) -> Any:
    """Which parameters learn, by name (never those in ``frozen``, e.g. the selection biases).

    ``all`` (BTX); ``router``; ``router+attn`` (routers and attention only: embeddings, norms,
    LM head, experts and any shared expert stay frozen); ``all-but-experts`` (BTX's "frozen
    experts" ablation: everything but the routed experts learns); ``new-expert+router`` (the
    routers and the expert ``mix --add-expert`` added, by ``new_expert``); ``hypermoe`` (the routers and
    HyperMoE's modules, experts frozen). Noisy top-k's noise
    weights belong to the routers, and so do attention experts' routers (``mix --attention-experts``).
    """
    router_prefixes = tuple(f"{name}." for name, _ in [*controller.routers, *attention_routers])
    if cfg.train == "all":
        chosen = lambda name: True  # noqa: E731
    elif cfg.train == "router":
        chosen = lambda name: name.startswith(router_prefixes)  # noqa: E731
    elif cfg.train == "all-but-experts":
        chosen = lambda name: not is_routed_expert(name)  # noqa: E731
    elif (
        cfg.train == "new-expert+router"
    ):  # the routers and the expert mix --add-expert added (moekit.steps.tune.new_expert)
        chosen = lambda name: name.startswith(router_prefixes) or new_expert(name)  # noqa: E731
    elif cfg.train == "hypermoe":  # HyperMoE's hypernetwork, expert embeddings and selection MLPs, and the routers
        chosen = lambda name: name.startswith(router_prefixes) or is_hypermoe_parameter(name)  # noqa: E731
    else:
        chosen = lambda name: name.startswith(router_prefixes) or ".self_attn." in name  # noqa: E731
    return lambda name: name not in frozen and chosen(name)


def selection_bias(model: torch.nn.Module, controller: RoutingController, cfg: TuneConfig) -> SelectionBias:
    """The routers' selection biases for ``--balance bias``; a clear refusal for models without them, and for models
    whose routers choose every expert (the bias would change no selection)."""
    biases = find_selection_biases(controller.routers)
    if biases is None:
        raise UnsupportedArchitectureError(
            f"--balance bias is refused for {model.config.model_type}: loss-free balancing learns a per-expert "
            "bias that changes which experts are selected, also at inference (DeepSeek-V3 stores it as "
            f"e_score_correction_bias), and {type(model).__name__}'s routers have no such tensor. The "
            "bias would be lost on export and the saved model would route differently from the tuned one.",
            f"Mix with {_bias_target_list()}, or use --balance switch (optionally with --balance-scope global) "
            "or --balance btx.",
        )
    if controller.top_k >= controller.num_experts:
        raise InvalidOptionError(
            f"--balance bias cannot balance this MoE: it routes every token to top-{controller.top_k} of "
            f"{controller.num_experts} experts, i.e. to all of them, so a selection bias changes no selection and "
            "stays exactly 0.",
            f"Mix with --top-k {max(1, controller.num_experts - 1)} or less (or more branches) for sparse routing, "
            "or tune with --balance switch.",
        )
    return SelectionBias(biases, cfg.bias_rate, cfg.bias_rule)


def _bias_target_list() -> str:
    """``--target glm4_moe (llama, qwen2 seeds) or ...`` for the refusal of --balance bias."""
    return " or ".join(
        f"--target {name} ({', '.join(families)} seeds)" for name, families in selection_bias_targets().items()
    )
