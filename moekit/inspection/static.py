"""Static statistics of a checkpoint, read tensor by tensor from safetensors (no model built).

For MoEs written in a layout moekit knows (the targets of its adapters), it reports per layer
the router's row norms (one per expert) and the experts' pairwise cosine similarity: experts
mixed from branches start as distinct as the branches' FFNs, upcycled ones identical, and the
similarity shows how far training moved them apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moekit.arch import adapter_for_moe
from moekit.arch.base import DENSE_FFN_PROJECTIONS, ArchAdapter
from moekit.io.checkpoint import Checkpoint

_EXPERT_KEYS = ("num_local_experts", "num_experts")


def num_experts_of(config: dict[str, Any]) -> int | None:
    """Experts per layer from a config (None for dense models)."""
    return next((int(config[k]) for k in _EXPERT_KEYS if config.get(k)), None)


def _expert_matrix(checkpoint: Checkpoint, adapter: ArchAdapter, layer: int, experts: int) -> torch.Tensor:
    """All experts of a layer as rows of flattened (gate, up, down) weights, fp32 [E, params]."""
    if adapter.fused_experts is not None:
        gate_up, down = (checkpoint.get(f"model.layers.{layer}.{adapter.moe_block}.{n}").float() for n in adapter.fused_experts)
        return torch.cat([gate_up.reshape(experts, -1), down.reshape(experts, -1)], dim=1)
    rows = []
    for expert in range(experts):
        rows.append(torch.cat([checkpoint.get(adapter.expert_name(layer, expert, p)).float().reshape(-1) for p in DENSE_FFN_PROJECTIONS]))
    return torch.stack(rows)


def _layer_stats(checkpoint: Checkpoint, adapter: ArchAdapter, layer: int, experts: int) -> dict[str, Any]:
    router = checkpoint.get(adapter.router_name(layer)).float()
    matrix = _expert_matrix(checkpoint, adapter, layer, experts)
    unit = matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.T
    off_diagonal = cosine[~torch.eye(experts, dtype=torch.bool)].view(experts, experts - 1) if experts > 1 else cosine
    return {
        "layer": layer,
        "router_row_norms": [round(float(v), 6) for v in router.norm(dim=1)],
        "expert_cosine": [[round(float(v), 6) for v in row] for row in cosine],
        "mean_expert_cosine": float(off_diagonal.mean()),
        "expert_drift": [round(1 - float(v), 6) for v in off_diagonal.mean(dim=1)],  # 1 - mean cosine to the others
        "expert_params": int(matrix.shape[1]),
    }


def static_report(checkpoint: Checkpoint) -> dict[str, Any]:
    """Architecture, parameter counts (total and active per token), and per-layer router/expert stats."""
    config = checkpoint.config
    total = sum(math.prod(t.shape) for t in checkpoint.tensors.values())
    experts = num_experts_of(config)
    report: dict[str, Any] = {
        "model_type": checkpoint.model_type,
        "architectures": config.get("architectures", []),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "total_params": total,
        "is_moe": experts is not None,
    }
    if experts is None:
        report["active_params"] = total
        return report
    top_k = int(config.get("num_experts_per_tok", 1))
    report.update(experts=experts, top_k=top_k)
    adapter = adapter_for_moe(checkpoint.model_type)
    if adapter is None:
        report["note"] = f"per-layer router/expert statistics need a layout moekit knows; {checkpoint.model_type} is not one"
        return report
    layers = [_layer_stats(checkpoint, adapter, layer, experts) for layer in range(int(config["num_hidden_layers"]))]
    inactive = sum((experts - top_k) * layer["expert_params"] for layer in layers)
    report.update(active_params=total - inactive, per_layer=layers)
    return report
