"""Llama, Qwen2 and Qwen3 -> Glm4Moe (GLM-4.5): the target with a loss-free balancing bias.

Glm4Moe's decoder layer is a Llama/Qwen block with an MoE whose router scores experts with a
sigmoid, chooses them by score + ``e_score_correction_bias`` (DeepSeek-V3's selection bias,
which ``tune --balance bias`` learns) and weighs them by the unbiased scores, renormalised
(``norm_topk_prob``) and times ``routed_scaling_factor``. Its shared experts
(``mlp.shared_experts``, ungated, width ``moe_intermediate_size * n_shared_experts``) are
mandatory: without ``--seed-as shared`` they are written with down_proj = 0, so they add
nothing until trained.

Values the "equal experts = dense" invariant needs, each a trap if left at the library default
(docs/reference.md §5, checked against transformers 5.24): ``partial_rotary_factor`` 1.0 (the
default 0.5 rotates half of each head), ``first_k_dense_replace`` 0 and
``num_nextn_predict_layers`` 0 (every layer an MoE, no multi-token-prediction layer),
``norm_topk_prob`` true, one expert group unless ``mix --groups G --topk-groups M`` asks for
group-limited routing (DeepSeek-V3's rule, which Glm4Moe's router implements). Qwen2's q/k/v
biases map to ``attention_bias`` (o_proj never has one in Glm4Moe), Qwen3's q/k norms to
``use_qk_norm``. vLLM's Glm4Moe needs an explicit ``lm_head``, so a tied seed's head is written
out (same logits, untied).
"""

from moekit.arch import register
from moekit.arch.base import ArchAdapter, SharedExpertSpec

_QWEN_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_NO_ATTENTION_OUTPUT_BIAS = {
    "attention_bias": "has no bias on the attention output projection",
    "mlp_bias": "has no MLP biases",
}


def _glm4_moe(dense_type: str, **family: object) -> ArchAdapter:
    common: dict = dict(
        moe_type="glm4_moe",
        moe_architecture="Glm4MoeForCausalLM",
        moe_block="mlp",
        expert_projections=_QWEN_NAMES,
        num_experts_keys=("n_routed_experts",),
        expert_size_key="moe_intermediate_size",
        rope_overrides={"partial_rotary_factor": 1.0},
        shared=SharedExpertSpec("shared_experts", count_key="n_shared_experts"),
        scoring="sigmoid",
        selection_bias="gate.e_score_correction_bias",
        routed_scale_key="routed_scaling_factor",
        fp32_router=True,
        untied_head=True,
        expert_group_keys=("n_group", "topk_group"),
        notes="Sigmoid router with a selection bias (e_score_correction_bias, learned by tune --balance bias); "
        "partial_rotary_factor 1.0, every layer an MoE, norm_topk_prob true.",
    )
    fixed = {
        "n_group": 1,  # one group: plain top-k (mix --groups sets both)
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "num_nextn_predict_layers": 0,
        "norm_topk_prob": True,
    }
    fixed.update(family.pop("fixed_config", {}))  # type: ignore[arg-type]
    return ArchAdapter(dense_type=dense_type, fixed_config=fixed, **common, **family)  # type: ignore[arg-type]


register(_glm4_moe("llama", refused_config_flags=_NO_ATTENTION_OUTPUT_BIAS), default=False)
register(
    _glm4_moe(
        "qwen2",
        fixed_config={"attention_bias": True},
        allowed_bias=(r"self_attn\.(q|k|v)_proj\.bias",),
        refused_config_flags={"use_sliding_window": "has no sliding-window attention"},
    ),
    default=False,
)
register(
    _glm4_moe(
        "qwen3",
        fixed_config={"use_qk_norm": True},
        refused_config_flags={
            "attention_bias": "has no bias on the attention output projection",
            "use_sliding_window": "has no sliding-window attention",
        },
    ),
    default=False,
)
