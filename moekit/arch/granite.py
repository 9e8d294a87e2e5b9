"""Granite -> GraniteMoE.

GraniteMoE stores a layer's experts stacked in two tensors: ``input_linear`` [E, 2I, H] (each
expert's gate rows, then its up rows) and ``output_linear`` [E, H, I]; the router is
``router.layer``. Granite's multipliers (embedding, residual, attention, logits) carry over, and
the embedding multiplier is applied when calibrating centroid routers. GraniteMoE renormalises
its top-k weights, so equal experts reproduce the dense model.
"""

from moekit.arch import register
from moekit.arch.base import ArchAdapter

GRANITE = register(
    ArchAdapter(
        dense_type="granite",
        moe_type="granitemoe",
        moe_architecture="GraniteMoeForCausalLM",
        moe_block="block_sparse_moe",
        fused_experts=("input_linear.weight", "output_linear.weight"),
        router_suffix="router.layer.weight",
        memory_block="block_sparse_moe",
        memory_router="router.weight",
        extra_config_keys=(
            "embedding_multiplier",
            "logits_scaling",
            "residual_multiplier",
            "attention_multiplier",
            "attention_bias",
        ),
        allowed_bias=(r"self_attn\.(q|k|v|o)_proj\.bias",),  # when attention_bias is true
        refused_config_flags={"mlp_bias": "has no MLP biases"},
        embedding_multiplier_key="embedding_multiplier",
        notes="Experts stored stacked (input_linear/output_linear) as GraniteMoE expects; Granite multipliers kept.",
    )
)
