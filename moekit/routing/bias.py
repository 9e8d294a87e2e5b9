"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): learning the routers' selection bias.

The bias lives in the model itself: transformers' GLM-4.5, ERNIE 4.5, DeepSeek-V3 and similar
routers hold an ``e_score_correction_bias`` [E] (ERNIE: [1, E]) that is added to the scores to
*choose* experts, while the gate values come from the unbiased scores. So the bias tune learns is
exported with the weights, and plain transformers routes the saved model exactly as tune did.

After each optimiser step, with c_i the step's assignments of expert i over the whole global
batch (all micro-batches and data-parallel ranks) and mean(c) their mean:

    sign rule (DeepSeek-V3):      b_i += u * sign(mean(c) - c_i)
    proportional (Wang et al.):   b_i += u * (mean(c) - c_i) / mean(c)

Under-loaded experts rise, over-loaded ones sink. The bias is not a trained parameter (no
gradient, no optimiser state, no weight decay); it is part of the model's state, so DCP
checkpoints carry it and a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Literal

import torch

from moekit.routing import balance

BIAS_NAME = "e_score_correction_bias"
BiasRule = Literal["sign", "proportional"]


def find_selection_biases(routers: list[tuple[str, torch.nn.Module]]) -> list[tuple[str, torch.Tensor]] | None:
    """Each router's selection bias (full state-dict name, tensor), or None if the routers have none."""
    found = []
    for name, router in routers:
        tensors = dict(router.named_buffers()) | dict(router.named_parameters())
        match = next(((key, t) for key, t in tensors.items() if key.split(".")[-1] == BIAS_NAME), None)
        if match is None:
            return None
        found.append((f"{name}.{match[0]}", match[1]))
    return found


class SelectionBias:
    """The routers' selection biases, updated from each step's global assignment counts."""

    def __init__(self, biases: list[tuple[str, torch.Tensor]], rate: float, rule: BiasRule = "sign") -> None:
        self.names = [name for name, _ in biases]
        self.tensors = [tensor for _, tensor in biases]
        self.rate, self.rule = rate, rule

    def values(self) -> torch.Tensor:
        """The current biases, [layers, E] (gathered whole where FSDP shards them)."""
        return torch.stack([_full(t).reshape(-1).float().cpu() for t in self.tensors])

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> dict[str, float]:
        """Apply one step's update from its global counts [layers, E]; return summary metrics of the new bias."""
        for layer, tensor in enumerate(self.tensors):
            current = _full(tensor).reshape(-1).float().cpu()
            new = balance.update_selection_bias(
                current, counts[layer], self.rate, proportional=self.rule == "proportional"
            )
            _assign(tensor, new)
        values = self.values()
        return {
            "bias_abs_max": float(values.abs().max()),
            "bias_spread": float((values.max(dim=1).values - values.min(dim=1).values).mean()),
        }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also when it is an FSDP2 shard (DTensor)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _assign(tensor: torch.Tensor, values: torch.Tensor) -> None:
    """Set ``tensor`` (plain or DTensor shard) to ``values`` (same number of elements), in place."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    values = values.reshape(tensor.shape).to(tensor.dtype)
    if isinstance(tensor, DTensor):
        tensor.copy_(
            distribute_tensor(values.to(tensor.device_mesh.device_type), tensor.device_mesh, tensor.placements)
        )
    else:
        tensor.copy_(values.to(tensor.device))
