"""Qwen3 -> Qwen3-MoE. q_norm/k_norm carry over; ``norm_topk_prob`` must be true."""

from moekit.arch import register
from moekit.arch.base import ArchAdapter

QWEN3 = register(
    ArchAdapter(
        dense_type="qwen3",
        moe_type="qwen3_moe",
        moe_architecture="Qwen3MoeForCausalLM",
        moe_block="mlp",
        expert_projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        num_experts_keys=("num_experts", "num_local_experts"),
        expert_size_key="moe_intermediate_size",
        extra_config_keys=("use_sliding_window", "sliding_window", "attention_bias"),
        fixed_config={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
        allowed_bias=(r"self_attn\.(q|k|v|o)_proj\.bias",),  # when attention_bias is true
        notes="norm_topk_prob true (the default false would change the logits).",
    )
)
