"""``mix --attention-experts``: each source's attention becomes an attention expert (Branch-Attend-Mix).

Per layer, the sources (branches, and the seed when it is routed) keep their own query and
output projections (and key/value ones with ``--attention-kv expert``), stacked along a new
first axis under the dense names; per-expert q/k norms get one module per expert; a new router
per layer mixes them (``moekit/modeling``). With shared KV, k/v projections (and k_norm) are
averaged like every other shared tensor. The layout is ``moekit.arch.moekit_moe``'s.

With identical sources every attention expert equals the seed's attention and the routing
weights sum to one, so the model computes the seed's function (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moekit.arch.base import LAYER_TENSOR
from moekit.arch.moekit_moe import attention_expert_name, attention_role, attention_router_name
from moekit.config import MixConfig
from moekit.io.floats import from_float32, to_float32
from moekit.io.writer import PlannedTensor, StreamingShardWriter
from moekit.steps.mix.inputs import MixInputs
from moekit.steps.mix.tensors import average_rows, checked, random_router, seed_from


@dataclass(frozen=True)
class AttentionPlan:
    """The attention experts of every layer: how many, KV mode, routing."""

    experts: int
    shared_kv: bool
    top_k: int

    def role(self, name: str) -> str | None:
        """``stacked``, ``per_expert`` or None (an ordinary averaged tensor) for a dense per-layer tensor."""
        match = LAYER_TENSOR.match(name)
        return None if match is None else attention_role(match.group(2), self.shared_kv)

    def config(self) -> dict[str, Any]:
        """The moekit_moe config keys of the attention experts."""
        return {
            "attention_experts": self.experts,
            "attention_kv": "shared" if self.shared_kv else "expert",
            "attention_top_k": self.top_k,
        }


def attention_plan(cfg: MixConfig, inputs: MixInputs) -> AttentionPlan | None:
    """The attention experts ``cfg`` asks for (one per source), or None."""
    if not cfg.attention_experts:
        return None
    return AttentionPlan(len(inputs.experts), cfg.attention_kv == "shared", cfg.attention_top_k)


def planned_layer(inputs: MixInputs, names: list[str], dtype: str, plan: AttentionPlan | None) -> list[PlannedTensor]:
    """A layer's non-FFN output tensors in write order: averaged ones as they are, attention experts' stacked or
    one per expert."""
    planned = []
    for name in names:
        shape = inputs.seed.tensors[name].shape
        role = plan.role(name) if plan else None
        if role == "stacked":
            assert plan is not None
            planned.append(PlannedTensor(name, dtype, (plan.experts, *shape)))
        elif role == "per_expert":
            assert plan is not None
            planned += [PlannedTensor(attention_expert_name(name, e), dtype, shape) for e in range(plan.experts)]
        else:
            planned.append(PlannedTensor(name, dtype, shape))
    return planned


def planned_router(inputs: MixInputs, layer: int, dtype: str, plan: AttentionPlan) -> PlannedTensor:
    """The attention router of ``layer``, written after the layer's MoE block."""
    return PlannedTensor(attention_router_name(layer), dtype, (plan.experts, inputs.seed.config["hidden_size"]))


def _source_values(inputs: MixInputs, name: str) -> list[tuple[np.ndarray, str]]:
    """Every source's stored values of tensor ``name`` (raw, with their dtype code), checked for NaN/inf."""
    values = []
    for source in inputs.experts:
        checkpoint = source.checkpoint
        info = checkpoint.tensors[name]
        raw = checkpoint.array_rows(name, 0, info.shape[0] if info.shape else 1)
        values.append(checked(raw, info.dtype, name, checkpoint))
    return values


def _stored(raw: np.ndarray, source_code: str, code: str) -> np.ndarray:
    """Values in the output dtype: bit for bit when it is the source's."""
    return raw if source_code == code else from_float32(to_float32(raw, source_code), code)


def write_expert_tensor(
    writer: StreamingShardWriter,
    inputs: MixInputs,
    name: str,
    role: str,
    code: str,
    plan: AttentionPlan,
    keep: dict[str, Any] | None,
) -> None:
    """Write dense tensor ``name`` as the attention experts hold it (stacked, or one copy per expert).

    With ``keep`` (centroid calibration), also store the sources' fp32 average under the dense name:
    calibration runs the averaged dense layer.
    """
    values = _source_values(inputs, name)
    shape = inputs.seed.tensors[name].shape
    if role == "stacked":
        writer.write_chunks(name, code, (plan.experts, *shape), [_stored(r, c, code) for r, c in values])
    else:
        for expert, (raw, source_code) in enumerate(values):
            writer.write_array(attention_expert_name(name, expert), code, _stored(raw, source_code, code))
    if keep is not None:
        import torch

        average = np.concatenate(list(average_rows([(e.checkpoint, 1.0 / plan.experts) for e in inputs.experts], name)))
        keep[name] = torch.from_numpy(average.reshape(shape))


def write_router(
    writer: StreamingShardWriter,
    inputs: MixInputs,
    cfg: MixConfig,
    layer: int,
    code: str,
    plan: AttentionPlan,
    centroid_rows: Any,
) -> None:
    """Write ``layer``'s attention router: the centroid rows calibration gave, or a small random start."""
    if centroid_rows is not None:
        rows = centroid_rows.numpy()
    else:
        std = cfg.router_std or float(inputs.seed.config.get("initializer_range", 0.02))
        rows = random_router(
            plan.experts, inputs.seed.config["hidden_size"], std, seed_from(cfg.random_seed, layer, -2)
        )
    writer.write_array(attention_router_name(layer), code, from_float32(rows.astype(np.float32), code))
