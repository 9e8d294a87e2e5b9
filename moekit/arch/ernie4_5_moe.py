"""Llama -> Ernie4.5-MoE (ERNIE 4.5): BTX's own softmax router, plus a selection bias.

ERNIE 4.5's router is BTX's (softmax over all experts, top-k, renormalised) with a per-expert
``e_score_correction_bias`` added to the probabilities for choosing experts only: with the bias
at zero it routes exactly as Mixtral does, and ``tune --balance bias`` can learn it. The bias is
stored as ``mlp.moe_statics.e_score_correction_bias`` [1, E].

Its attention rotates interleaved dimension pairs (2i, 2i+1) where Llama rotates (i, i + d/2):
the q/k projection rows of every head are reordered to match (q and k get the same permutation,
so attention scores are unchanged). Shared experts are optional (``moe_num_shared_experts``):
written only with ``--seed-as shared``. Every layer is an MoE layer (``moe_layer_start_index`` 0,
interval 1); ``use_bias`` would add biases to o_proj and every MLP, so biased Llamas are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moekit.arch import register
from moekit.arch.base import ArchAdapter, SharedExpertSpec

_QK_PROJECTION = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k)_proj\.weight$")


@dataclass(frozen=True)
class ErnieAdapter(ArchAdapter):
    """The ERNIE 4.5 target: interleaved-RoPE row order, and MoE layer range from the layer count."""

    def moe_config_kwargs(
        self,
        dense: dict[str, Any],
        num_experts: int,
        top_k: int,
        expert_size: int | None = None,
        shared_size: int | None = None,
        routed_scale: float = 1.0,
    ) -> dict[str, Any]:
        """Llama's config as ERNIE 4.5 names it, every layer an MoE layer."""
        kwargs = super().moe_config_kwargs(dense, num_experts, top_k, expert_size, shared_size, routed_scale)
        kwargs["moe_layer_end_index"] = int(dense["num_hidden_layers"]) - 1
        return kwargs

    def dense_row_order(self, name: str, config: dict[str, Any]) -> list[int] | None:
        """q/k rows per head: new row 2i = old row i, new row 2i+1 = old row i + head_dim/2."""
        if not _QK_PROJECTION.match(name):
            return None
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        heads = (
            config["num_attention_heads"]
            if ".q_proj." in name
            else config.get("num_key_value_heads") or config["num_attention_heads"]
        )
        half = head_dim // 2
        within = [i // 2 + (half if i % 2 else 0) for i in range(head_dim)]
        return [head * head_dim + offset for head in range(heads) for offset in within]


register(
    ErnieAdapter(
        dense_type="llama",
        moe_type="ernie4_5_moe",
        moe_architecture="Ernie4_5_MoeForCausalLM",
        moe_block="mlp",
        expert_projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        num_experts_keys=("moe_num_experts",),
        top_k_key="moe_k",
        expert_size_key="moe_intermediate_size",
        fixed_config={"use_bias": False, "moe_layer_start_index": 0, "moe_layer_interval": 1, "moe_norm_min": 1e-12},
        refused_config_flags={"attention_bias": "has no attention biases", "mlp_bias": "has no MLP biases"},
        shared=SharedExpertSpec("shared_experts", mandatory=False, count_key="moe_num_shared_experts"),
        selection_bias="moe_statics.e_score_correction_bias",
        selection_bias_rows=True,
        fp32_router=True,
        notes="Softmax router (BTX's) with a selection bias (e_score_correction_bias, learned by tune --balance bias); "
        "q/k rows reordered for ERNIE's interleaved RoPE.",
    ),
    default=False,
)
