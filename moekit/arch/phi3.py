"""Phi-3 -> Mixtral.

Phi-3 stores fused projections: ``self_attn.qkv_proj`` (q rows, then k, then v) and
``mlp.gate_up_proj`` (gate rows, then up). This adapter exposes them as row slices named like
Llama's (q/k/v_proj, gate/up_proj), which is exactly Mixtral's layout, so nothing is copied or
concatenated when mixing. Partial rotary embeddings (``partial_rotary_factor`` < 1) have no
Mixtral equivalent and are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moekit.arch import register
from moekit.arch.base import ArchAdapter, row_slice
from moekit.arch.llama import MIXTRAL_EXPERT_PROJECTIONS
from moekit.errors import UnsupportedArchitectureError
from moekit.io.checkpoint import TensorInfo

_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn\.)qkv_proj\.weight$")
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp\.)gate_up_proj\.weight$")


@dataclass(frozen=True)
class Phi3Adapter(ArchAdapter):
    """Phi-3 with its fused projections split into row views."""

    def dense_views(self, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Split qkv_proj and gate_up_proj into Llama-named row slices."""
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        q_rows = config["num_attention_heads"] * head_dim
        kv_rows = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
        views: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            if match := _QKV.match(name):
                starts = {"q_proj": (0, q_rows), "k_proj": (q_rows, kv_rows), "v_proj": (q_rows + kv_rows, kv_rows)}
                for proj, (start, rows) in starts.items():
                    views[f"{match.group(1)}{proj}.weight"] = row_slice(info, start, rows)
            elif match := _GATE_UP.match(name):
                half = info.shape[0] // 2
                views[f"{match.group(1)}gate_proj.weight"] = row_slice(info, 0, half)
                views[f"{match.group(1)}up_proj.weight"] = row_slice(info, half, half)
            else:
                views[name] = info
        return views

    def check_dense(self, config: dict[str, Any], tensor_names: list[str]) -> None:
        """Refuse partial rotary embeddings, then run the common checks."""
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        factor = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
        if factor < 1.0:
            raise UnsupportedArchitectureError(
                f"This Phi-3 model rotates only part of each head (partial_rotary_factor={factor}); Mixtral "
                "rotates all of it.",
                "Only Phi-3 models with full rotary embeddings can be mixed into Mixtral.",
            )
        super().check_dense(config, tensor_names)


PHI3 = register(
    Phi3Adapter(
        dense_type="phi3",
        moe_type="mixtral",
        moe_architecture="MixtralForCausalLM",
        moe_block="block_sparse_moe",
        expert_projections=MIXTRAL_EXPERT_PROJECTIONS,
        extra_config_keys=("sliding_window", "original_max_position_embeddings"),
        notes="Fused qkv_proj and gate_up_proj split into Mixtral's separate projections.",
    )
)
