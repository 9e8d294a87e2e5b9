"""Routing statistics of an MoE over domain data, gathered by hooks during one forward pass.

Per router call the hook output (logits, gate weights, top-k indices) feeds vectorised
accumulators: a bincount per layer for assignments and top-1 choices, the gate weight each
expert receives (a second view of load: selection counts say how often an expert runs, gate
mass how much its output counts), a multi-hot product for top-k co-selection, sums of
per-token router entropy and z. For routers with a selection bias, the share of tokens whose
experts the bias changed (against top-k of the unbiased scores); for MoE blocks with a shared
expert, its share of the block's output norm. No second pass, no per-token Python loop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.routing import balance
from moekit.routing.bias import find_selection_biases
from moekit.routing.control import RoutingController, find_attention_routers
from moekit.routing.modes import group_limited_top_k
from moekit.routing.modes import scores as router_scores


@dataclass
class RoutingTally:
    """Running sums over every token seen, per domain and layer."""

    layers: int
    experts: int
    assignments: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> [L, E] top-k counts
    top1: dict[str, torch.Tensor] = field(default_factory=dict)  # domain -> [L, E] top-1 counts
    tokens: dict[str, int] = field(default_factory=dict)
    coselection: torch.Tensor | None = None  # [L, E, E]
    entropy_sum: torch.Tensor | None = None  # [L]
    z_sum: torch.Tensor | None = None  # [L]
    samples: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # domain -> (ids, top-1 expert)
    gate_mass: torch.Tensor | None = None  # [L, E] sum of gate weights per expert
    biases: list[torch.Tensor] | None = None  # each layer's selection bias [E], if the routers have one
    decoder_layers: list[int] | None = None  # the decoder layer of each router (dense layers have none)
    scoring: str = "softmax"
    bias_changed: torch.Tensor | None = None  # [L] tokens whose chosen experts the bias changed
    shared_share_sum: torch.Tensor | None = None  # [L] sum over tokens of |shared| / (|shared| + |routed|)
    shared_tokens: torch.Tensor | None = None  # [L]
    soft: bool = False  # soft routing (every expert runs): load counts each token at its largest-weight expert
    attention: RoutingTally | None = None  # the attention experts' routing (mix --attention-experts)
    groups: tuple[int, int] | None = None  # group-limited routing (groups, groups per token), as the model's config

    def __post_init__(self) -> None:
        self.coselection = torch.zeros(self.layers, self.experts, self.experts)
        self.entropy_sum = torch.zeros(self.layers)
        self.z_sum = torch.zeros(self.layers)
        self.gate_mass = torch.zeros(self.layers, self.experts)
        self.bias_changed = torch.zeros(self.layers)
        self.shared_share_sum = torch.zeros(self.layers)
        self.shared_tokens = torch.zeros(self.layers)

    def _changed_by_bias(self, logits: torch.Tensor, indices: torch.Tensor, layer: int) -> float:
        """Tokens whose chosen experts differ from the unbiased choice (top-k, within the best groups if grouped)."""
        assert self.biases is not None
        unbiased_scores, top_k = router_scores(logits, self.scoring), indices.shape[1]
        if self.groups is not None:
            unbiased = group_limited_top_k(unbiased_scores, top_k, *self.groups)
        else:
            unbiased = unbiased_scores.topk(top_k, dim=-1).indices
        return float((unbiased.sort(dim=-1).values != indices.sort(dim=-1).values).any(dim=-1).sum())

    def add_shared(self, layer: int, shared: torch.Tensor, routed: torch.Tensor) -> None:
        """Fold one block call's shared-expert and routed outputs ([N, H] each) into the output-share sums."""
        assert self.shared_share_sum is not None and self.shared_tokens is not None
        shared_norm, routed_norm = shared.float().norm(dim=-1), routed.float().norm(dim=-1)
        self.shared_share_sum[layer] += float((shared_norm / (shared_norm + routed_norm).clamp_min(1e-12)).sum())
        self.shared_tokens[layer] += shared.shape[0]

    def add(self, domain: str, controller: RoutingController, ids: torch.Tensor, sample_layer: int) -> None:
        """Fold one batch's router records into the sums."""
        records = controller.collected()
        counts = torch.zeros(self.layers, self.experts)
        top1 = torch.zeros(self.layers, self.experts)
        assert self.coselection is not None and self.entropy_sum is not None and self.z_sum is not None
        for layer, record in enumerate(records):
            indices = record.indices.reshape(record.logits.shape[0], -1)
            top1[layer] = balance.assignment_counts(indices[:, 0], self.experts).cpu()
            counts[layer] = top1[layer] if self.soft else balance.assignment_counts(indices, self.experts).cpu()
            chosen = torch.zeros(indices.shape[0], self.experts, device=indices.device).scatter_(1, indices, 1.0)
            self.coselection[layer] += (chosen.T @ chosen).cpu()
            probs = balance.router_scores(record.logits, self.scoring)  # softmax, or normalised sigmoid scores
            self.entropy_sum[layer] += float(-(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).sum())
            self.z_sum[layer] += float(torch.logsumexp(record.logits.float(), dim=-1).pow(2).sum())
            weights = record.weights.reshape(indices.shape).float()
            self.gate_mass[layer] += (
                torch.zeros(self.experts, device=indices.device)
                .index_add_(0, indices.reshape(-1), weights.reshape(-1))
                .cpu()
            )
            if self.biases is not None:
                self.bias_changed[layer] += self._changed_by_bias(record.logits.float(), indices, layer)
        self.assignments[domain] = self.assignments.get(domain, torch.zeros_like(counts)) + counts
        self.top1[domain] = self.top1.get(domain, torch.zeros_like(top1)) + top1
        self.tokens[domain] = self.tokens.get(domain, 0) + ids.numel()
        if domain not in self.samples:  # the first block of each domain, for --tokens
            first = records[sample_layer].indices.reshape(ids.numel(), -1)[: ids.shape[1], 0]
            self.samples[domain] = (ids[0].tolist(), first.tolist())


def _attention_tally(model: torch.nn.Module) -> tuple[RoutingController | None, RoutingTally | None]:
    """A controller and a tally for the model's attention-expert routers, if it has any."""
    routers = find_attention_routers(model)
    if not routers:
        return None, None
    controller = RoutingController(model, routers=routers)
    soft = not int(getattr(routers[0][1], "top_k", 0) or 0)
    layers = [_decoder_layer(name, index) for index, (name, _) in enumerate(routers)]
    return controller, RoutingTally(len(routers), controller.num_experts, decoder_layers=layers, soft=soft)


def collect_routing(
    model: torch.nn.Module, blocks: dict[str, torch.Tensor], batch: int, progress: Any, sample_layer: int | None = None
) -> RoutingTally:
    """Run every domain's blocks through ``model`` once and tally its routing (its attention experts' in
    ``.attention``)."""
    controller = RoutingController(model)
    layers = len(controller.routers)
    if sample_layer is not None and sample_layer >= layers:
        controller.remove()
        from moekit.errors import InvalidOptionError

        raise InvalidOptionError(
            f"--tokens-layer {sample_layer} is out of range.", f"The model has MoE layers 0..{layers - 1}."
        )
    from moekit.arch import adapter_for_moe, router_scoring

    biases = find_selection_biases(controller.routers)
    adapter = adapter_for_moe(str(getattr(model.config, "model_type", "")))
    tally = RoutingTally(
        layers,
        controller.num_experts,
        biases=[t.detach().reshape(-1) for _, t in biases] if biases else None,
        scoring=router_scoring(str(getattr(model.config, "model_type", ""))),
        decoder_layers=[_decoder_layer(name, index) for index, (name, _) in enumerate(controller.routers)],
        groups=adapter.expert_groups(model.config) if adapter is not None else None,
    )
    device = next(model.parameters()).device
    model.eval()
    handles = _shared_expert_hooks(model, controller, tally)
    attention_controller, tally.attention = _attention_tally(model)
    sample = layers // 2 if sample_layer is None else sample_layer
    try:
        with torch.no_grad():
            for domain, domain_blocks in blocks.items():
                for chunk in domain_blocks.split(batch):
                    controller.clear()
                    ids = chunk.long().to(device)
                    if attention_controller is not None:
                        attention_controller.clear()
                    model(input_ids=ids)
                    tally.add(domain, controller, ids.cpu(), sample)
                    if attention_controller is not None and tally.attention is not None:
                        tally.attention.add(domain, attention_controller, ids.cpu(), tally.attention.layers // 2)
                    progress(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
        controller.remove()
        if attention_controller is not None:
            attention_controller.remove()
    return tally


def _decoder_layer(router_name: str, fallback: int) -> int:
    """The decoder layer a router module sits in (``model.layers.3.mlp.gate`` -> 3)."""
    found = re.search(r"layers\.(\d+)\.", router_name)
    return int(found.group(1)) if found else fallback


def _shared_expert_hooks(model: torch.nn.Module, controller: RoutingController, tally: RoutingTally) -> list[Any]:
    """Hooks that split each MoE block's output into its routed part (the ``experts`` module's output) and the rest.

    The rest is the shared expert's contribution, after its gate where it has one (Qwen2-MoE).
    Blocks without a shared expert get no hooks.
    """
    from moekit.arch import shared_expert_modules

    shared_names = shared_expert_modules()
    modules = dict(model.named_modules())
    handles = []
    for layer, (name, _) in enumerate(controller.routers):
        block = modules.get(name.rpartition(".")[0])
        experts = getattr(block, "experts", None)
        if block is None or experts is None or not any(getattr(block, n, None) is not None for n in shared_names):
            continue
        routed: dict[str, torch.Tensor] = {}

        def keep_routed(_m: Any, _i: Any, output: torch.Tensor, store: dict = routed) -> None:
            store["out"] = output.detach().clone()  # some blocks add the shared output into it in place

        def split_output(_m: Any, _i: Any, output: Any, store: dict = routed, layer: int = layer) -> None:
            total = (output[0] if isinstance(output, tuple) else output).detach()
            part = store.pop("out").reshape(-1, total.shape[-1])
            tally.add_shared(layer, total.reshape(-1, total.shape[-1]) - part, part)

        handles += [experts.register_forward_hook(keep_routed), block.register_forward_hook(split_output)]
    return handles


def _fractions(counts: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in counts / counts.sum().clamp_min(1e-12)]


def domain_experts(expert_names: list[str], domain: str) -> list[int]:
    """The experts that belong to ``domain``: the one named after it, or its chunks ``domain.0``, ``domain.1``...
    (``mix --split``)."""
    prefix = f"{domain}."
    return [
        i for i, n in enumerate(expert_names) if n == domain or (n.startswith(prefix) and n[len(prefix) :].isdigit())
    ]


def _layer_report(tally: RoutingTally, layer: int, counts: torch.Tensor, total_tokens: int) -> dict[str, Any]:
    """One layer's numbers: load, balance metrics, dead experts, router entropy and z, co-selection, domain shares."""
    assert tally.coselection is not None and tally.entropy_sum is not None and tally.z_sum is not None
    assert tally.gate_mass is not None and tally.bias_changed is not None
    assert tally.shared_share_sum is not None and tally.shared_tokens is not None
    co = tally.coselection[layer].clone()
    co.fill_diagonal_(0)
    report = {
        "layer": tally.decoder_layers[layer] if tally.decoder_layers else layer,
        "tokens_per_expert": [int(v) for v in counts],
        "load_fraction": _fractions(counts),
        "top1_fraction": _fractions(sum(t[layer] for t in tally.top1.values())),
        "gate_fraction": _fractions(tally.gate_mass[layer]),
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in balance.load_metrics(counts).items()},
        "dead_expert_ids": [e for e in range(tally.experts) if counts[e] == 0],
        "router_entropy": round(float(tally.entropy_sum[layer]) / total_tokens, 6),
        "router_z": round(float(tally.z_sum[layer]) / total_tokens, 6),
        "coselection": [[int(v) for v in row] for row in co],
        "domain_matrix": {d: _fractions(a[layer]) for d, a in tally.assignments.items()},
    }
    if tally.biases is not None:
        report["selection_bias"] = [round(float(v), 6) for v in tally.biases[layer]]
        report["changed_by_bias"] = round(float(tally.bias_changed[layer]) / total_tokens, 6)
    if float(tally.shared_tokens[layer]):
        report["shared_output_share"] = round(float(tally.shared_share_sum[layer] / tally.shared_tokens[layer]), 6)
    return report


def _mean(layers: list[dict[str, Any]], key: str) -> float:
    return round(sum(layer[key] for layer in layers) / len(layers), 6)


def _summary(layers: list[dict[str, Any]], experts: int) -> dict[str, Any]:
    """The report's summary over layers (means and maxima; dead experts in total)."""
    summary = {
        "load_imbalance_mean": _mean(layers, "load_imbalance"),
        "load_imbalance_max": max(layer["load_imbalance"] for layer in layers),
        "maxvio_mean": _mean(layers, "maxvio"),
        "maxvio_max": max(layer["maxvio"] for layer in layers),
        "dead_experts_total": sum(layer["dead_experts"] for layer in layers),
        "layers_with_dead_experts": [layer["layer"] for layer in layers if layer["dead_experts"]],
        "router_entropy_mean": _mean(layers, "router_entropy"),
        "max_router_entropy": round(math.log(experts), 6),
    }
    if "changed_by_bias" in layers[0]:
        summary["changed_by_bias_mean"] = _mean(layers, "changed_by_bias")
    shares = [layer["shared_output_share"] for layer in layers if "shared_output_share" in layer]
    if shares:
        summary["shared_output_share_mean"] = round(sum(shares) / len(shares), 6)
    return summary


def routing_report(tally: RoutingTally, expert_names: list[str] | None) -> dict[str, Any]:
    """Every routing number as plain JSON-able data (schema in docs/commands/inspect.md)."""
    total_tokens = sum(tally.tokens.values())
    all_counts = sum(tally.assignments.values())
    assert isinstance(all_counts, torch.Tensor)
    layers = [_layer_report(tally, layer, all_counts[layer], total_tokens) for layer in range(tally.layers)]
    mean_matrix = {
        d: [round(sum(layer["domain_matrix"][d][e] for layer in layers) / len(layers), 6) for e in range(tally.experts)]
        for d in tally.assignments
    }
    report: dict[str, Any] = {
        "experts": tally.experts,
        "expert_names": expert_names,
        "domains": {d: {"tokens": n} for d, n in tally.tokens.items()},
        "layers": layers,
        "domain_matrix_mean": mean_matrix,
        "summary": _summary(layers, tally.experts),
    }
    if expert_names:
        own = {d: domain_experts(expert_names, d) for d in tally.assignments}
        if any(own.values()):
            report["in_domain_share"] = {
                d: round(sum(mean_matrix[d][e] for e in ids), 6) for d, ids in own.items() if ids
            }
    report["samples"] = {d: {"ids": ids, "top1_expert": experts} for d, (ids, experts) in tally.samples.items()}
    if tally.attention is not None:
        names = expert_names if expert_names and len(expert_names) == tally.attention.experts else None
        report["attention"] = {**routing_report(tally.attention, names), "soft": tally.attention.soft}
    return report
