"""Routing statistics of an MoE over domain data, gathered by hooks during one forward pass.

Per router call the hook output (logits, top-k indices) feeds vectorised accumulators: a
bincount per layer for assignments and top-1 choices, a multi-hot product for top-k
co-selection, sums of per-token router entropy and z. No second pass, no per-token Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from moekit.routing import balance
from moekit.routing.control import RoutingController


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

    def __post_init__(self) -> None:
        self.coselection = torch.zeros(self.layers, self.experts, self.experts)
        self.entropy_sum = torch.zeros(self.layers)
        self.z_sum = torch.zeros(self.layers)

    def add(self, domain: str, controller: RoutingController, ids: torch.Tensor, sample_layer: int) -> None:
        """Fold one batch's router records into the sums."""
        records = controller.collected()
        counts = torch.zeros(self.layers, self.experts)
        top1 = torch.zeros(self.layers, self.experts)
        assert self.coselection is not None and self.entropy_sum is not None and self.z_sum is not None
        for layer, record in enumerate(records):
            indices = record.indices.reshape(record.logits.shape[0], -1)
            counts[layer] = balance.assignment_counts(indices, self.experts).cpu()
            top1[layer] = balance.assignment_counts(indices[:, 0], self.experts).cpu()
            chosen = torch.zeros(indices.shape[0], self.experts, device=indices.device).scatter_(1, indices, 1.0)
            self.coselection[layer] += (chosen.T @ chosen).cpu()
            logp = torch.log_softmax(record.logits.float(), dim=-1)
            self.entropy_sum[layer] += float(-(logp.exp() * logp).sum(dim=-1).sum())
            self.z_sum[layer] += float(torch.logsumexp(record.logits.float(), dim=-1).pow(2).sum())
        self.assignments[domain] = self.assignments.get(domain, torch.zeros_like(counts)) + counts
        self.top1[domain] = self.top1.get(domain, torch.zeros_like(top1)) + top1
        self.tokens[domain] = self.tokens.get(domain, 0) + ids.numel()
        if domain not in self.samples:  # the first block of each domain, for --tokens
            first = records[sample_layer].indices.reshape(ids.numel(), -1)[: ids.shape[1], 0]
            self.samples[domain] = (ids[0].tolist(), first.tolist())


def collect_routing(model: torch.nn.Module, blocks: dict[str, torch.Tensor], batch: int, progress: Any, sample_layer: int | None = None) -> RoutingTally:
    """Run every domain's blocks through ``model`` once and tally its routing."""
    controller = RoutingController(model)
    layers = len(controller.routers)
    if sample_layer is not None and sample_layer >= layers:
        controller.remove()
        from moekit.errors import InvalidOptionError

        raise InvalidOptionError(f"--tokens-layer {sample_layer} is out of range.", f"The model has MoE layers 0..{layers - 1}.")
    tally = RoutingTally(layers, controller.num_experts)
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            for domain, domain_blocks in blocks.items():
                for chunk in domain_blocks.split(batch):
                    controller.clear()
                    ids = chunk.long().to(device)
                    model(input_ids=ids)
                    tally.add(domain, controller, ids.cpu(), layers // 2 if sample_layer is None else sample_layer)
                    progress(len(chunk))
    finally:
        controller.remove()
    return tally


def _fractions(counts: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in counts / counts.sum().clamp_min(1e-12)]


def routing_report(tally: RoutingTally, expert_names: list[str] | None) -> dict[str, Any]:
    """Every routing number as plain JSON-able data (schema in docs/commands/inspect.md)."""
    total_tokens = sum(tally.tokens.values())
    all_counts = sum(tally.assignments.values())
    assert isinstance(all_counts, torch.Tensor) and tally.coselection is not None
    assert tally.entropy_sum is not None and tally.z_sum is not None
    layers = []
    for layer in range(tally.layers):
        counts = all_counts[layer]
        metrics = balance.load_metrics(counts)
        co = tally.coselection[layer].clone()
        co.fill_diagonal_(0)
        layers.append({
            "layer": layer,
            "tokens_per_expert": [int(v) for v in counts],
            "load_fraction": _fractions(counts),
            "top1_fraction": _fractions(sum(t[layer] for t in tally.top1.values())),
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
            "dead_expert_ids": [e for e in range(tally.experts) if counts[e] == 0],
            "router_entropy": round(float(tally.entropy_sum[layer]) / total_tokens, 6),
            "router_z": round(float(tally.z_sum[layer]) / total_tokens, 6),
            "coselection": [[int(v) for v in row] for row in co],
            "domain_matrix": {d: _fractions(a[layer]) for d, a in tally.assignments.items()},
        })
    mean_matrix = {d: [round(sum(l["domain_matrix"][d][e] for l in layers) / len(layers), 6) for e in range(tally.experts)] for d in tally.assignments}
    report: dict[str, Any] = {
        "experts": tally.experts,
        "expert_names": expert_names,
        "domains": {d: {"tokens": n} for d, n in tally.tokens.items()},
        "layers": layers,
        "domain_matrix_mean": mean_matrix,
        "summary": {
            "load_imbalance_mean": round(sum(l["load_imbalance"] for l in layers) / len(layers), 6),
            "load_imbalance_max": max(l["load_imbalance"] for l in layers),
            "maxvio_mean": round(sum(l["maxvio"] for l in layers) / len(layers), 6),
            "maxvio_max": max(l["maxvio"] for l in layers),
            "dead_experts_total": sum(l["dead_experts"] for l in layers),
            "layers_with_dead_experts": [l["layer"] for l in layers if l["dead_experts"]],
            "router_entropy_mean": round(sum(l["router_entropy"] for l in layers) / len(layers), 6),
            "max_router_entropy": round(math.log(tally.experts), 6),
        },
    }
    if expert_names:
        shared = {d: expert_names.index(d) for d in tally.assignments if d in expert_names}
        if shared:
            report["in_domain_share"] = {d: mean_matrix[d][e] for d, e in shared.items()}
    report["samples"] = {d: {"ids": ids, "top1_expert": experts} for d, (ids, experts) in tally.samples.items()}
    return report
