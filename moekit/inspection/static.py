"""Static statistics of a checkpoint, read tensor by tensor from safetensors (no model built).

For MoEs in a layout moekit knows (``moekit.arch.layouts``: its own targets and a few
read-only families, each in the per-expert hub layout or transformers 5's fused one), it
reports per layer the router's row norms (one per expert) and the experts' pairwise cosine
similarity: experts mixed from branches start as distinct as the branches' FFNs, upcycled ones
identical, and the similarity shows how far training moved them apart.

Numerics: the similarity comes from the experts' Gram matrix, accumulated in float64 over row
chunks of every expert tensor. float64 keeps identical experts at cosine 1 to ~1e-15 (in fp32 a
few million products already drift by ~1e-4, so trained experts could not be told from copies),
and chunking keeps memory flat: a few MB per expert, whatever the expert size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from moekit.arch import layouts_for_moe
from moekit.arch.layouts import ExpertLayout
from moekit.io.checkpoint import Checkpoint, TensorInfo
from moekit.routing.bias import BIAS_NAME

_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_k")
_GRAM_CHUNK_ELEMENTS = 1 << 20  # values per expert per Gram update (8 MB in float64)
_SELECTION_BIAS = re.compile(rf"^model\.layers\.(\d+)\..*{re.escape(BIAS_NAME)}$")


def num_experts_of(config: dict[str, Any]) -> int | None:
    """Experts per layer from a config (None for dense models)."""
    return next((int(config[k]) for k in _EXPERT_KEYS if config.get(k)), None)


def top_k_of(config: dict[str, Any]) -> int:
    """Experts per token from a config (1 when it does not say)."""
    return next((int(config[k]) for k in _TOP_K_KEYS if config.get(k)), 1)


def selection_biases(checkpoint: Checkpoint) -> dict[int, list[float]]:
    """Each layer's selection bias (``e_score_correction_bias``: GLM-4.5, ERNIE 4.5, DeepSeek-V3...), by layer."""
    found = {}
    for name in checkpoint.tensors:
        match = _SELECTION_BIAS.match(name)
        if match:
            found[int(match.group(1))] = [round(float(v), 6) for v in checkpoint.get(name).reshape(-1)]
    return dict(sorted(found.items()))


def _row_chunks(checkpoint: Checkpoint, info: TensorInfo) -> Iterator[torch.Tensor]:
    """A 2-D-or-more tensor as float64 row chunks of about ``_GRAM_CHUNK_ELEMENTS`` values, flattened."""
    rows = info.shape[0] if info.shape else 1
    step = max(1, _GRAM_CHUNK_ELEMENTS // max(1, math.prod(info.shape[1:])))
    for start in range(0, rows, step):
        yield checkpoint.read_rows(info, start, min(rows, start + step)).to(torch.float64).reshape(-1)


def _expert_slice(info: TensorInfo, expert: int) -> TensorInfo:
    """Expert ``expert``'s [R, C] part of a stacked [E, R, C] tensor (contiguous on disk)."""
    per_expert = info.nbytes // info.shape[0]
    return replace(info, shape=info.shape[1:], offset=info.offset + expert * per_expert, nbytes=per_expert)


def _expert_parts(checkpoint: Checkpoint, layout: ExpertLayout, layer: int, experts: int) -> Iterator[list[TensorInfo]]:
    """Per weight matrix of the experts, the E tensors (one per expert) that hold it."""
    if layout.stacked is not None:
        for template in layout.stacked:
            info = checkpoint.tensors[template.format(layer=layer)]
            yield [_expert_slice(info, e) for e in range(experts)]
        return
    assert layout.per_expert is not None
    for template in layout.per_expert.values():
        yield [checkpoint.tensors[template.format(layer=layer, expert=e)] for e in range(experts)]


def expert_gram(checkpoint: Checkpoint, layout: ExpertLayout, layer: int, experts: int) -> tuple[torch.Tensor, int]:
    """The experts' Gram matrix [E, E] (float64) over all their weights, and the weights per expert."""
    gram = torch.zeros(experts, experts, dtype=torch.float64)
    params = 0
    for infos in _expert_parts(checkpoint, layout, layer, experts):
        params += math.prod(infos[0].shape)
        for chunks in zip(*(_row_chunks(checkpoint, info) for info in infos)):
            block = torch.stack(chunks)  # [E, chunk]
            gram += block @ block.T
    return gram, params


def _layer_stats(checkpoint: Checkpoint, layout: ExpertLayout, layer: int, experts: int) -> dict[str, Any]:
    router = checkpoint.get(layout.router_name(layer)).to(torch.float64)
    gram, params = expert_gram(checkpoint, layout, layer, experts)
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    cosine = (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0)
    off_diagonal = cosine[~torch.eye(experts, dtype=torch.bool)].view(experts, experts - 1) if experts > 1 else cosine
    return {
        "layer": layer,
        "router_row_norms": [round(float(v), 6) for v in router.norm(dim=1)],
        "expert_cosine": [[float(v) for v in row] for row in cosine],
        "mean_expert_cosine": float(off_diagonal.mean()),
        "expert_drift": [float(1 - v) for v in off_diagonal.mean(dim=1)],  # 1 - mean cosine to the others
        "expert_params": params,
    }


def _unique_parameter_count(checkpoint: Checkpoint) -> int:
    """Parameters stored, counting a tied LM head once (it is absent from tied checkpoints anyway)."""
    total = sum(math.prod(t.shape) for t in checkpoint.tensors.values())
    if checkpoint.config.get("tie_word_embeddings") and "lm_head.weight" in checkpoint.tensors:
        total -= math.prod(checkpoint.tensors["lm_head.weight"].shape)  # a redundant copy of the embedding
    return total


def static_report(checkpoint: Checkpoint) -> dict[str, Any]:
    """Architecture, parameter counts (total and active per token), and per-layer router/expert stats."""
    config = checkpoint.config
    total = _unique_parameter_count(checkpoint)
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
    top_k = top_k_of(config)
    report.update(experts=experts, top_k=top_k)
    biases = selection_biases(checkpoint)
    if biases:  # chosen by score + bias, weighed by the score alone
        report["selection_bias"] = {
            "per_layer": {str(k): v for k, v in biases.items()},
            "abs_max": max(abs(x) for values in biases.values() for x in values),
        }
    known = layouts_for_moe(checkpoint.model_type)
    layout = known.detect(checkpoint.tensors) if known is not None else None
    if layout is None:
        why = "is not a family it knows" if known is None else "is stored under tensor names it does not know"
        report["note"] = (
            f"per-layer router/expert statistics need a layout moekit knows; this {checkpoint.model_type} model {why}"
        )
        return report
    moe_layers = layout.moe_layers(checkpoint.tensors)
    layers = [_layer_stats(checkpoint, layout, layer, experts) for layer in moe_layers]
    inactive = sum((experts - top_k) * layer["expert_params"] for layer in layers)
    report.update(active_params=total - inactive, expert_layout=layout.name, per_layer=layers)
    dense = sorted(set(range(int(config["num_hidden_layers"]))) - set(moe_layers))
    if dense:  # e.g. GLM-4.5's first_k_dense_replace layers
        report["dense_layers"] = dense
    return report
