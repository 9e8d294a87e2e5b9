"""Dense families -> moekit_moe, moekit's own MoE family (``moekit/modeling``).

moekit_moe keeps the dense family's whole config and builds the model from the family's own
classes, replacing each layer's MLP with routed experts (per-expert tensors ``mlp.experts.E.*``,
router ``mlp.gate``) and, with ``mix --attention-experts``, its attention with attention experts.
It is the target for what no transformers architecture expresses: readers load it with
``trust_remote_code=True`` (transformers 4.57 and 5); vLLM and llama.cpp cannot.

Attention experts stack each expert's projection along a new first axis under the dense name
(``self_attn.q_proj.weight`` [E, out, in], ``self_attn.q_proj.bias`` [E, out]); per-expert norms
are ``self_attn.q_norm.E.weight``; the router is ``self_attn.router.weight`` [E, hidden]. With
shared key/value projections, ``k_proj``/``v_proj``/``k_norm`` keep the dense names and shapes
(averaged like any other shared tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.arch import register
from moekit.arch.base import ArchAdapter

MODEL_TYPE = "moekit_moe"
ATTENTION_PREFIX = "self_attn."
KV_MODULES = ("k_proj", "v_proj", "k_norm")  # shared between attention experts with attention_kv: shared
PER_EXPERT_MODULES = ("q_norm", "k_norm")  # per-expert norms: a module per expert (the family's own norm class)
# Families whose attention moekit_moe's attention experts rebuild exactly (q/k/v/o projections,
# optional biases, per-head or whole-projection q/k norms, RoPE on whole heads).
ATTENTION_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")
# Dense config keys that describe the file, not the model: not copied into the MoE config.
_NOT_COPIED = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")


@dataclass(frozen=True)
class MoekitAdapter(ArchAdapter):
    """A dense family mapped to moekit_moe: the family's whole config, plus the MoE keys."""

    def moe_config_kwargs(
        self,
        dense: dict[str, Any],
        num_experts: int,
        top_k: int,
        expert_size: int | None = None,
        shared_size: int | None = None,
        routed_scale: float = 1.0,
    ) -> dict[str, Any]:
        """The dense config unchanged, plus the base family, expert count, top-k and expert width."""
        kwargs = {k: v for k, v in dense.items() if k not in _NOT_COPIED and k != "torch_dtype"}
        kwargs.update(
            base_model_type=self.dense_type,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=expert_size if expert_size != dense.get("intermediate_size") else None,
        )
        return kwargs


def attention_role(rest: str, shared_kv: bool) -> str | None:
    """How an attention-expert output holds a dense per-layer tensor (name after ``model.layers.<L>.``).

    ``stacked``: one [E, ...] tensor under the dense name; ``per_expert``: a norm module per
    expert; None: not an attention expert's (averaged like every shared tensor, e.g. shared KV).
    """
    if not rest.startswith(ATTENTION_PREFIX):
        return None
    module = rest[len(ATTENTION_PREFIX) :].split(".")[0]
    if shared_kv and module in KV_MODULES:
        return None
    return "per_expert" if module in PER_EXPERT_MODULES else "stacked"


def attention_expert_name(name: str, expert: int) -> str:
    """The output name of expert ``expert``'s copy of a per-expert norm (``...self_attn.q_norm.E.weight``)."""
    stem, leaf = name.rsplit(".", 1)
    return f"{stem}.{expert}.{leaf}"


def attention_router_name(layer: int) -> str:
    """The attention router of ``layer`` [E, hidden]."""
    return f"model.layers.{layer}.self_attn.router.weight"


def _moekit_adapter(family: ArchAdapter) -> MoekitAdapter:
    identity = {p: p for p in ("gate_proj", "up_proj", "down_proj")}
    return MoekitAdapter(
        dense_type=family.dense_type,
        moe_type=MODEL_TYPE,
        moe_architecture="MoekitMoeForCausalLM",
        moe_block="mlp",
        expert_projections=identity,
        num_experts_keys=("num_local_experts",),
        expert_size_key="moe_intermediate_size",
        allowed_bias=(r"self_attn\.(q|k|v|o)_proj\.bias",),
        refused_config_flags={"mlp_bias": "has no MLP biases in its experts"},
        embedding_multiplier_key=family.embedding_multiplier_key,
        ships_modeling=True,
        notes=(
            "moekit's own model family: load with trust_remote_code=True (transformers 4.57 and 5; "
            "the modeling code ships with the weights). vLLM and llama.cpp cannot read it."
        ),
    )


def register_all() -> None:
    """Register moekit_moe as a (non-default) target of every family whose attention it rebuilds."""
    from moekit.arch import get_adapter

    for family in ATTENTION_FAMILIES:
        register(_moekit_adapter(get_adapter(family)), default=False)
