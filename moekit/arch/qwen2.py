"""Qwen2 -> Qwen2-MoE.

Qwen2-MoE always has a shared expert (gated by sigmoid(x . w)). moekit writes it with the
seed's gate/up projections and a zero down projection: its output is exactly zero at first
(so equal experts still reproduce the dense model) and it learns during ``tune``.
``norm_topk_prob`` must be true for the top-k weights to sum to one.
"""

from moekit.arch import register
from moekit.arch.base import ArchAdapter, SharedExpertSpec

QWEN2 = register(
    ArchAdapter(
        dense_type="qwen2",
        moe_type="qwen2_moe",
        moe_architecture="Qwen2MoeForCausalLM",
        moe_block="mlp",
        expert_projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        num_experts_keys=("num_experts", "num_local_experts"),
        expert_size_key="moe_intermediate_size",
        extra_config_keys=("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
        fixed_config={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True},
        allowed_bias=(r"self_attn\.(q|k|v)_proj\.bias",),
        shared=SharedExpertSpec("shared_expert", gated=True, size_key="shared_expert_intermediate_size"),
        notes="Shared expert written with down_proj = 0 (exact at start, trainable); norm_topk_prob true.",
    )
)
