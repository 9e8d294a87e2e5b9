"""OLMo 2 -> FlexOlmo (OLMo 2's post-norm layout with a sparse MoE block; FlexOlmo is itself
a BTX-style model built from domain experts). ``norm_topk_prob`` must be true."""

from moekit.arch import register
from moekit.arch.base import ArchAdapter

OLMO2 = register(
    ArchAdapter(
        dense_type="olmo2",
        moe_type="flex_olmo",
        moe_architecture="FlexOlmoForCausalLM",
        moe_block="mlp",
        expert_projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        num_experts_keys=("num_experts",),
        fixed_config={"norm_topk_prob": True},
        refused_config_flags={"attention_bias": "has no attention biases"},
        notes="Post-norm layout kept; norm_topk_prob true (the default false would change the logits).",
    )
)
