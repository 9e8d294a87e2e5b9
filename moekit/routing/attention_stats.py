"""Balancing statistics of attention-expert routers (``mix --attention-experts``) while tuning.

Attention experts are routed softly by default (every expert runs, with its softmax weight), so
the load that matters is the gate mass each expert receives, not a selection count. Per optimiser
step (training forwards only) this records, over all ranks: each layer's share of gate mass per
attention expert, its MaxVio against the uniform share ((max share - 1/E) / (1/E)), and the mean
router entropy per token. One index_add and one entropy sum per layer per forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.routing.objective import all_reduce_sum


class AttentionRoutingStats:
    """Forward hooks on the attention routers that sum gate mass and entropy during training forwards."""

    def __init__(self, routers: list[tuple[str, torch.nn.Module]], device: torch.device) -> None:
        self.device = device
        self.layers = len(routers)
        self.experts = int(routers[0][1].weight.shape[0]) if routers else 0
        self._reset()
        self._handles = [router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(routers)]

    def _reset(self) -> None:
        self.mass = torch.zeros(self.layers, self.experts)
        self.entropy = torch.zeros(self.layers)
        self.tokens = torch.zeros(self.layers)

    def _hook(self, layer: int) -> Any:
        def hook(module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
            if not module.training:
                return  # evaluation forwards are not part of the step
            logits, weights, indices = (t.detach() for t in output[:3])
            mass = torch.zeros(self.experts, device=weights.device, dtype=torch.float32)
            mass.index_add_(0, indices.reshape(-1), weights.float().reshape(-1))
            probs = torch.softmax(logits.float(), dim=-1)
            self.mass[layer] += mass.cpu()
            self.entropy[layer] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
            self.tokens[layer] += logits.shape[0]

        return hook

    def step_metrics(self) -> dict[str, Any]:
        """The step's attention-routing metrics over all ranks (empty when nothing was routed), then reset."""
        if not self.layers:
            return {}
        summed = all_reduce_sum(torch.cat([self.mass.reshape(-1), self.entropy, self.tokens]), self.device).cpu()
        self._reset()
        mass = summed[: self.layers * self.experts].reshape(self.layers, self.experts)
        entropy, tokens = summed[self.layers * self.experts : -self.layers], summed[-self.layers :]
        if float(tokens.sum()) == 0:
            return {}
        share = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)
        maxvio = (share.max(dim=1).values * self.experts - 1.0).tolist()
        return {
            "attn_maxvio": sum(maxvio) / len(maxvio),
            "attn_maxvio_per_layer": [round(v, 4) for v in maxvio],
            "attn_router_entropy": float((entropy / tokens.clamp_min(1)).mean()),
        }

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()
