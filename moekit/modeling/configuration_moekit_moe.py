"""Configuration of moekit's own MoE family (``model_type: moekit_moe``).

This file is written next to the weights of every moekit_moe model and loaded by transformers
with ``trust_remote_code=True``: it imports only transformers, never moekit, and runs on
transformers 4.57 and 5.

A moekit_moe model is a dense family's model (``base_model_type``: llama, qwen3, ...) whose
decoder layers keep their norms and residual wiring, with the FFN replaced by routed experts and,
optionally, the attention by attention experts (BAM). Every key of the base family's config is
kept at the top level, so the base family's own modules read this config as their own.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# moekit_moe's own keys; every other key belongs to the base family's config.
MOEKIT_KEYS = (
    "base_model_type",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "attention_experts",
    "attention_kv",
    "attention_top_k",
    "hypermoe",
)
_NOT_COPIED = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


class MoekitMoeConfig(PretrainedConfig):
    """A dense family's config plus the MoE settings.

    Args:
        base_model_type: the dense family whose layers the model is built from.
        num_local_experts: routed FFN experts per layer.
        num_experts_per_tok: FFN experts each token is sent to (top-k of a softmax, renormalised).
        moe_intermediate_size: each FFN expert's width (None: the base ``intermediate_size``).
        attention_experts: attention experts per layer (0: the base family's attention, unchanged).
        attention_kv: ``shared`` (one key/value projection, per-expert query and output) or
            ``expert`` (every projection per expert).
        attention_top_k: 0 for soft routing over every attention expert, else top-k.
        hypermoe: HyperMoE's sizes (``embed_dim``, ``adapter_dim``, ``hyper_dim``), or None without it.

    The model's forward adds no load-balancing loss (``moekit tune`` adds its own); the routers'
    outputs can be read with forward hooks on ``MoekitRouter`` and ``MoekitAttentionRouter``.
    """

    model_type = "moekit_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        base_model_type: str = "llama",
        num_local_experts: int = 2,
        num_experts_per_tok: int = 1,
        moe_intermediate_size: int | None = None,
        attention_experts: int = 0,
        attention_kv: str = "shared",
        attention_top_k: int = 0,
        hypermoe: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if base_model_type not in CONFIG_MAPPING:
            raise ValueError(f"moekit_moe: unknown base_model_type {base_model_type!r}")
        if attention_kv not in ("shared", "expert"):
            raise ValueError(f"moekit_moe: attention_kv must be 'shared' or 'expert', not {attention_kv!r}")
        if "torch_dtype" in kwargs:  # the older readers' name, written next to dtype; transformers 5 warns on it
            legacy = kwargs.pop("torch_dtype")
            if _TRANSFORMERS_5:
                kwargs.setdefault("dtype", legacy)
            else:
                kwargs["torch_dtype"] = legacy
        base_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_COPIED}
        # The base family's class fills in its defaults (and normalises RoPE settings); explicit
        # values win. Its keys become ours, so its modules find every attribute they read.
        base = CONFIG_MAPPING[base_model_type](**base_kwargs).to_dict()
        values = {k: v for k, v in base.items() if k not in _NOT_COPIED}
        values.update(kwargs)  # explicit values win; auto_map and architectures are ours
        self.base_model_type = base_model_type
        self.num_local_experts = int(num_local_experts)
        self.num_experts_per_tok = int(num_experts_per_tok)
        self.moe_intermediate_size = moe_intermediate_size
        self.attention_experts = int(attention_experts)
        self.attention_kv = attention_kv
        self.attention_top_k = int(attention_top_k)
        self.hypermoe = dict(hypermoe) if hypermoe else None
        super().__init__(**values)
        for key, value in values.items():  # keys the base class sets aside (transformers 5: use_cache)
            if not hasattr(self, key):
                setattr(self, key, value)

    def base_config(self) -> PretrainedConfig:
        """The base family's own config class with this model's base values (for tools that need one)."""
        values = {k: v for k, v in self.to_dict().items() if k not in MOEKIT_KEYS and k not in _NOT_COPIED}
        return CONFIG_MAPPING[self.base_model_type](**values)


__all__ = ["MoekitMoeConfig"]
