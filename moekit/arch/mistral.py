"""Mistral -> Mixtral (Mixtral is Mistral with a sparse MoE block); keeps sliding_window."""

from moekit.arch import register
from moekit.arch.base import ArchAdapter
from moekit.arch.llama import MIXTRAL_EXPERT_PROJECTIONS, MIXTRAL_REFUSED_FLAGS

MISTRAL = register(
    ArchAdapter(
        dense_type="mistral",
        moe_type="mixtral",
        moe_architecture="MixtralForCausalLM",
        moe_block="block_sparse_moe",
        expert_projections=MIXTRAL_EXPERT_PROJECTIONS,
        extra_config_keys=("sliding_window",),
        refused_config_flags=MIXTRAL_REFUSED_FLAGS,
        notes="Mixtral renormalises the top-k weights, so equal experts reproduce the dense model.",
    )
)
