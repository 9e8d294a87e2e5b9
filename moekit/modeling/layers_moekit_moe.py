"""moekit_moe's layers: the routers, stacked expert projections and attention experts (BAM).

Shipped next to the weights of every moekit_moe model with ``modeling_moekit_moe.py``, which
imports it (transformers copies relative imports of remote code along); it imports only torch
and transformers (4.57 and 5), never moekit. See ``modeling_moekit_moe.py`` for the model.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    from transformers.integrations import ALL_ATTENTION_FUNCTIONS

from .configuration_moekit_moe import MoekitMoeConfig


def _family_module(base_model_type: str) -> Any:
    """The base family's modeling module (its RoPE and eager attention functions)."""
    return importlib.import_module(f"transformers.models.{base_model_type}.modeling_{base_model_type}")


class ExpertLinear(nn.Module):
    """E linear maps stacked: ``weight`` [E, out, in], optional ``bias`` [E, out]."""

    def __init__(self, experts: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(experts, out_features)) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., E, out]: every expert applied to every row."""
        experts, out_features, in_features = self.weight.shape
        flat_bias = None if self.bias is None else self.bias.reshape(-1)
        return F.linear(hidden, self.weight.reshape(-1, in_features), flat_bias).unflatten(-1, (experts, out_features))


class _Router(nn.Module):
    """A router: returns (logits [N, E], fp32 gate weights [N, s], expert indices [N, s]).

    ``top_k`` 0: soft routing (s = E, every expert with its softmax weight, largest first, so
    column 0 is the top-1 expert); else the top-k of the softmax, renormalised to sum to one.
    """

    def __init__(self, hidden_size: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden_size))
        self.top_k = top_k
        self.num_experts = experts

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = hidden_states.reshape(-1, self.weight.shape[1])
        logits = F.linear(hidden, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        if self.top_k <= 0 or self.top_k >= self.num_experts:
            weights, indices = torch.sort(probs, dim=-1, descending=True)
            return logits, weights, indices
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        return logits, weights / weights.sum(dim=-1, keepdim=True), indices


class MoekitRouter(_Router):
    """The router of a layer's FFN experts."""


class MoekitAttentionRouter(_Router):
    """The router of a layer's attention experts (a class of its own, so tools tell it from the FFN's)."""


def _per_expert_norms(norm: nn.Module, experts: int) -> nn.ModuleList:
    """E copies of a base-family norm module (q_norm/k_norm), one per attention expert."""
    return nn.ModuleList([copy.deepcopy(norm) for _ in range(experts)])


def _apply_norms(norms: nn.ModuleList | nn.Module | None, states: torch.Tensor) -> torch.Tensor:
    """Apply per-expert norms along dim -3 of [B, T, E, ..., D] (or one shared norm) with the family's own math."""
    if norms is None:
        return states
    if not isinstance(norms, nn.ModuleList):
        return norms(states)
    return torch.stack([norm(states[:, :, e]) for e, norm in enumerate(norms)], dim=2)


class MoekitAttentionExperts(nn.Module):
    """A layer's attention experts, built from the base family's attention module ``base``.

    The base module tells what the family does: its scaling (Granite's attention multiplier),
    biases (Qwen2), per-head (Qwen3) or whole-projection (OLMo 2) q/k norms, sliding window.
    """

    def __init__(self, config: MoekitMoeConfig, base: nn.Module, layer_idx: int) -> None:
        super().__init__()
        experts, hidden = config.attention_experts, config.hidden_size
        self.config, self.layer_idx, self.experts = config, layer_idx, experts
        self.head_dim = base.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.shared_kv = config.attention_kv == "shared"
        self.scaling = base.scaling
        self.attention_dropout = getattr(base, "attention_dropout", 0.0)
        self.sliding_window = getattr(base, "sliding_window", None)
        self.is_causal = True
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = ExpertLinear(experts, hidden, q_out, base.q_proj.bias is not None)
        self.o_proj = ExpertLinear(experts, q_out, hidden, base.o_proj.bias is not None)
        q_norm, k_norm = getattr(base, "q_norm", None), getattr(base, "k_norm", None)
        # per-head norms have one weight per head dim; OLMo 2's normalise the whole projection
        self.norm_whole = q_norm is not None and q_norm.weight.shape[-1] != self.head_dim
        self.q_norm = None if q_norm is None else _per_expert_norms(q_norm, experts)
        if self.shared_kv:
            self.k_proj, self.v_proj, self.k_norm = base.k_proj, base.v_proj, k_norm
        else:
            self.k_proj = ExpertLinear(experts, hidden, kv_out, base.k_proj.bias is not None)
            self.v_proj = ExpertLinear(experts, hidden, kv_out, base.v_proj.bias is not None)
            self.k_norm = None if k_norm is None else _per_expert_norms(k_norm, experts)
        kv_total = self.kv_heads if self.shared_kv else experts * self.kv_heads
        self.num_key_value_groups = experts * self.heads // kv_total
        self.router = MoekitAttentionRouter(hidden, experts, config.attention_top_k)
        self._rope = _family_module(config.base_model_type).apply_rotary_pos_emb
        self._eager = _family_module(config.base_model_type).eager_attention_forward

    def _project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, E*heads, T, D], keys and values [B, kv heads (x E), T, D], normalised as the family does."""
        batch, length = hidden.shape[:2]
        experts, d = self.experts, self.head_dim
        q = self.q_proj(hidden)  # [B, T, E, heads*D]
        if self.shared_kv:
            k, v = self.k_proj(hidden).unsqueeze(2), self.v_proj(hidden).unsqueeze(2)  # [B, T, 1, kv*D]
        else:
            k, v = self.k_proj(hidden), self.v_proj(hidden)  # [B, T, E, kv*D]
        if self.norm_whole:
            q, k = _apply_norms(self.q_norm, q), self._norm_keys(k)
        q = q.unflatten(-1, (self.heads, d))
        k, v = k.unflatten(-1, (self.kv_heads, d)), v.unflatten(-1, (self.kv_heads, d))
        if not self.norm_whole:
            q, k = _apply_norms(self.q_norm, q), self._norm_keys(k)
        q = q.reshape(batch, length, experts * self.heads, d).transpose(1, 2)
        k = k.reshape(batch, length, -1, d).transpose(1, 2)
        v = v.reshape(batch, length, -1, d).transpose(1, 2)
        return q, k, v

    def _norm_keys(self, k: torch.Tensor) -> torch.Tensor:
        if self.k_norm is None:
            return k
        if self.shared_kv:
            return self.k_norm(k)
        return _apply_norms(self.k_norm, k)

    def _group_queries(self, q: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Shared KV: order query heads (kv head, expert, member) so each KV head serves its group in every expert.

        ``q`` is [B, heads', T, D] going in, [B, T, heads', D] (the attention output) with ``inverse``.
        """
        if not self.shared_kv:
            return q
        experts, kv, members = self.experts, self.kv_heads, self.heads // self.kv_heads
        if inverse:
            b, t, _, d = q.shape
            return q.reshape(b, t, kv, experts, members, d).transpose(2, 3).reshape(b, t, -1, d)
        b, _, t, d = q.shape
        return q.reshape(b, experts, kv, members, t, d).transpose(1, 2).reshape(b, -1, t, d)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, hidden = hidden_states.shape
        _, weights, indices = self.router(hidden_states)  # fp32 weights
        gates = torch.zeros(batch * length, self.experts, dtype=torch.float32, device=weights.device)
        gates = gates.scatter(1, indices, weights.float()).reshape(batch, length, self.experts, 1)
        q, k, v = self._project(hidden_states)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        k, v = self._update_cache(k, v, cos, sin, kwargs)
        implementation = self.config._attn_implementation
        attend = self._eager if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS[implementation]
        if self.sliding_window is not None:
            kwargs["sliding_window"] = self.sliding_window
        out, attn_weights = attend(
            self,
            self._group_queries(q),
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = self._group_queries(out, inverse=True).reshape(batch, length, self.experts, -1)
        # each expert's output projection in the model's dtype (as the dense model's), then the weighted sum in
        # fp32, rounded once: identical experts give the dense output to the last bit in bf16 too
        per_expert = torch.einsum("bten,ehn->bteh", out, self.o_proj.weight)
        if self.o_proj.bias is not None:
            per_expert = per_expert + self.o_proj.bias
        mixed = (per_expert.float() * gates).sum(dim=2).to(out.dtype)
        return mixed, attn_weights

    def _update_cache(
        self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys and values to the layer's cache slot (transformers 5's ``cache`` or 4.x's
        ``past_key_values``)."""
        cache = kwargs.pop("cache", None)
        if cache is not None:
            return cache.update(k, v, self.layer_idx, kwargs=kwargs)
        past = kwargs.pop("past_key_values", None) or kwargs.pop("past_key_value", None)
        if past is not None:
            extra = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            return past.update(k, v, self.layer_idx, extra)
        return k, v
