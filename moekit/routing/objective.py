"""The tune objective: language-model loss plus named balancing terms, and per-step routing metrics.

Balance scope (Qiu et al. 2025): with ``micro``, ``f`` comes from the current micro-batch on
this process, as in transformers and BTX. With ``global``, each micro-batch's counts are summed
over data-parallel ranks (one all-reduce of a [layers, E] tensor) and accumulated over the
micro-batches of the optimiser step so far; the loss of micro-batch k uses the counts of
micro-batches 1..k, so at the last one they are the counts of the whole global batch (the
running form Megatron-LM also uses, since later micro-batches are not known yet).

``bias`` balancing (loss-free, :mod:`moekit.routing.bias`) adds no loss term of its own: after
each step the routers' selection bias moves against the step's global load. With it,
``aux_coef`` > 0 adds DeepSeek-V3's complementary sequence-wise loss. Probabilities in every
term use the family's score function (softmax, or normalised sigmoid scores for GLM-4.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from moekit.routing import balance
from moekit.routing.bias import SelectionBias
from moekit.routing.control import RoutingController


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum a tensor over data-parallel ranks (on ``device``: NCCL needs GPU tensors); return it on the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on_device = tensor.to(device)
        dist.all_reduce(on_device)
        return on_device.cpu()
    return tensor


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32), computed here rather than taken from ``model(labels=...).loss``.

    transformers adds its own router aux loss to ``.loss`` when a model's config has
    ``output_router_logits: true`` (common in third-party MoE configs): the model would be
    balanced twice and the reported ``lm_loss`` would be too high.
    """
    shifted = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))


@dataclass(frozen=True)
class BalanceSettings:
    """Which balancing terms, with which coefficients."""

    kind: Literal["switch", "btx", "bias", "none"] = "switch"
    aux_coef: float = 0.01
    z_coef: float = 0.0
    scope: Literal["micro", "global"] = "micro"
    scoring: str = "softmax"  # the family's score function, for the probabilities in the loss terms


class BalancedObjective:
    """Callable loss for the training loop; also accumulates the step's routing statistics."""

    def __init__(
        self, controller: RoutingController, settings: BalanceSettings, bias: SelectionBias | None = None
    ) -> None:
        self.controller, self.settings, self.bias = controller, settings, bias
        layers, experts = len(controller.routers), controller.num_experts
        self.global_counts = torch.zeros(layers, experts)
        self.micro_counts: list[torch.Tensor] = []  # this step's per-micro-batch counts (as used)
        self._step_counts = torch.zeros(layers, experts)
        self._sums: dict[str, float] = {}
        self._micro = 0
        self._dropped, self._routed = 0, 0
        self._stats: dict[str, float] = {}
        self._device: torch.device | str = "cpu"

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """LM loss + balancing terms for one micro-batch."""
        self.controller.clear()
        self.controller.token_ids = input_ids  # hash routing reads them
        lm_loss = next_token_loss(model(input_ids=input_ids).logits, input_ids)
        self._device = lm_loss.device
        records = self.controller.collected()
        self._sequences = input_ids.shape[0]
        counts = torch.stack([r.counts(self.controller.num_experts) for r in records]).cpu()
        if self.settings.scope == "global":
            counts = all_reduce_sum(counts, self._device)
            self.global_counts += counts
        self.micro_counts.append(counts)
        self._step_counts += counts
        used = self.global_counts if self.settings.scope == "global" else counts
        terms = self._terms(records, used.to(lm_loss.device))
        total = lm_loss + sum(terms.values(), torch.zeros((), device=lm_loss.device))
        for name, value in {"lm_loss": lm_loss, **terms}.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value.detach())
        self._micro += 1
        self._dropped += int(sum(r.stats.get("dropped", 0.0) for r in records))
        self._routed += sum(r.logits.shape[0] for r in records)
        for (
            record
        ) in records:  # mode statistics (capacity use, noise, temperature), averaged over layers and micro-batches
            for key, value in record.stats.items():
                if key != "dropped":
                    self._stats[key] = self._stats.get(key, 0.0) + value / len(records)
        return total, {}

    def _terms(self, records: list, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        settings, experts = self.settings, self.controller.num_experts
        terms: dict[str, torch.Tensor] = {}
        if settings.kind != "none" and settings.aux_coef > 0:
            per_layer = []
            for layer, record in enumerate(records):
                scores = balance.router_scores(record.logits, settings.scoring)
                if settings.kind == "switch":
                    per_layer.append(balance.switch_loss(counts[layer], scores.mean(dim=0)))
                elif settings.kind == "btx":
                    per_layer.append(
                        balance.btx_loss(
                            balance.sparse_gate_means(record.weights, record.indices, experts), scores.mean(dim=0)
                        )
                    )
                else:  # bias: DeepSeek-V3's complementary sequence-wise loss
                    per_layer.append(balance.sequence_loss(record.indices, scores, self._sequences))
            name = "sequence" if settings.kind == "bias" else settings.kind
            terms[f"aux_loss/{name}"] = settings.aux_coef * torch.stack(per_layer).mean()
        if settings.z_coef > 0:
            terms["z_loss"] = settings.z_coef * torch.stack([balance.z_loss(r.logits) for r in records]).mean()
        return terms

    def step_metrics(self) -> dict[str, Any]:
        """Metrics of the optimiser step just taken (over all ranks), then reset for the next step.

        Each named loss term is the value added to the loss (coefficient included), averaged over
        micro-batches and ranks; load metrics use the step's assignment counts of all ranks.
        """
        counts = self._step_counts.clone()
        if self.settings.scope == "micro":
            counts = all_reduce_sum(counts, self._device)
        sums = {**self._sums, **self._stats}
        extra = all_reduce_sum(
            torch.tensor([*sums.values(), float(self._micro), float(self._dropped), float(self._routed)]), self._device
        )
        names = list(sums)
        micro = extra[len(names)]
        row: dict[str, Any] = {name: float(extra[i] / micro) for i, name in enumerate(names)}
        per_layer = [balance.load_metrics(c) for c in counts]
        row["load_imbalance"] = sum(m["load_imbalance"] for m in per_layer) / len(per_layer)
        row["load_imbalance_max"] = max(m["load_imbalance"] for m in per_layer)
        row["maxvio"] = sum(m["maxvio"] for m in per_layer) / len(per_layer)
        row["maxvio_max"] = max(m["maxvio"] for m in per_layer)
        row["maxvio_per_layer"] = [round(m["maxvio"], 4) for m in per_layer]
        row["dead_experts"] = sum(m["dead_experts"] for m in per_layer)
        row["dropped_tokens"] = float(extra[-2] / extra[-1].clamp_min(1))
        self.last_step_counts = counts  # the step's counts over all ranks (for tests and reports)
        if self.bias is not None:  # loss-free balancing: the selection bias moves against this step's global load
            row.update(self.bias.update(counts))
        self.global_counts.zero_()
        self._step_counts.zero_()
        self.last_step_micro_counts, self.micro_counts = self.micro_counts, []
        self._sums, self._stats, self._micro, self._dropped, self._routed = {}, {}, 0, 0, 0
        return row
