"""Training compute: model FLOPs per token, so that baselines can be given the same budget as BTX.

The count is the usual one for transformers (Kaplan et al. 2020, "Scaling Laws", Table 1):
a forward pass costs ``2 N + 2 n_layer n_ctx d_attn`` FLOPs per token, where ``N`` is the number
of parameters that take part in matrix multiplies for that token (the input embedding is a lookup
and is left out; the LM head is a matmul and counts even when it shares the embedding's weights),
and the second term is attention's scores and weighted sum over the context. Training
(forward + backward) costs three times the forward pass. For an MoE, a token passes through
``top_k`` of the ``E`` routed experts of a layer, so routed-expert parameters count with weight
``top_k / E``; routers and shared experts always count.

The figures are model FLOPs (what MFU is measured against), not hardware FLOPs: recomputation
under activation checkpointing and the cheaper backward of frozen parameters are not subtracted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINING_MULTIPLIER = 3  # backward ~ 2x forward (Kaplan et al. 2020)


@dataclass(frozen=True)
class ModelCompute:
    """A model's parameter counts that matter for FLOPs."""

    active_params: int  # matmul parameters a token passes through (routed experts weighted by top_k / E)
    total_params: int  # every parameter once (tied weights once)
    layers: int
    attention_width: int  # num_attention_heads x head_dim (x attention experts: each runs its own queries)

    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs of one token at context ``seq_len``."""
        forward = 2 * self.active_params + 2 * self.layers * seq_len * self.attention_width
        return float(TRAINING_MULTIPLIER * forward)


def _is_routed_expert(name: str) -> bool:
    return ".experts." in f"{name}."


def model_compute(model_dir: Path | str) -> ModelCompute:
    """The FLOP-relevant counts of the model at ``model_dir``, from its config alone (no weights read).

    The model is built on the meta device, so nothing is allocated whatever its size.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.inspection.static import num_experts_of, top_k_of
    from moekit.modeling import register

    register()
    config_dict = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return compute_of(model, num_experts_of(config_dict), top_k_of(config_dict))


def compute_of(model: Any, experts: int | None, top_k: int) -> ModelCompute:
    """:class:`ModelCompute` of a built model (any device, meta included)."""
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    head = model.get_output_embeddings()
    share = min(1.0, top_k / experts) if experts else 1.0
    active = 0.0
    total = 0
    for name, param in model.named_parameters():  # tied parameters are listed once
        total += param.numel()
        if id(param) in embedding:
            continue
        active += param.numel() * (share if _is_routed_expert(name) else 1.0)
    if head is not None and id(head.weight) in embedding:
        active += head.weight.numel()  # tied head: the matmul happens even though the weights are shared
    config = model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    # attention experts (moekit_moe) attend with every expert's query heads: soft routing runs them all
    attention_experts = max(1, int(getattr(config, "attention_experts", 0) or 0))
    return ModelCompute(int(active), total, int(config.num_hidden_layers), heads * head_dim * attention_experts)


def training_flops(model_dir: Path | str, tokens: int, seq_len: int) -> float:
    """Model FLOPs of training ``model_dir`` on ``tokens`` tokens in blocks of ``seq_len``."""
    return model_compute(model_dir).training_flops_per_token(seq_len) * tokens
