"""Llama -> Mixtral. Mixtral's attention, norms and embeddings use Llama's names and shapes."""

from moekit.arch import register
from moekit.arch.base import ArchAdapter

MIXTRAL_EXPERT_PROJECTIONS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# Mixtral's attention and MLP have no bias terms.
MIXTRAL_REFUSED_FLAGS = {
    "attention_bias": "has no attention biases",
    "mlp_bias": "has no MLP biases",
}

LLAMA = register(
    ArchAdapter(
        dense_type="llama",
        moe_type="mixtral",
        moe_architecture="MixtralForCausalLM",
        moe_block="block_sparse_moe",
        expert_projections=MIXTRAL_EXPERT_PROJECTIONS,
        refused_config_flags=MIXTRAL_REFUSED_FLAGS,
        notes="Mixtral renormalises the top-k weights, so equal experts reproduce the dense model.",
    )
)
