"""moekit's own MoE family: a dense family's model with routed FFN experts and attention experts (BAM).

This file is written next to the weights of every moekit_moe model and loaded by transformers
with ``trust_remote_code=True``; it imports only torch and transformers (4.57 and 5), never moekit.

The model is built from the base family's own classes (``config.base_model_type``): its
embeddings, rotary embedding, norms, decoder-layer wiring, masks, cache handling and LM-head
forward. Two modules of each decoder layer are replaced:

- ``mlp`` becomes :class:`MoekitSparseMoeBlock`: a router (softmax, top-k, renormalised, as
  Mixtral) over experts that are the base family's own MLP class;
- with ``attention_experts > 0``, ``self_attn`` becomes :class:`MoekitAttentionExperts`
  (Branch-Attend-Mix, arXiv 2408.08274): E attention experts, each with its own query and output
  projections (and key/value ones with ``attention_kv: expert``; shared ones with ``shared``),
  mixed by a per-layer router, softly (every expert, softmax weights) or top-k.

With ``hypermoe`` in the config (``moekit tune --hypermoe``; HyperMoE, arXiv 2402.12656), each MoE
block also adds a bottleneck adapter to its routed output. The adapter's weights come from
:class:`MoekitHyperNetwork`, shared by all layers, fed with the sum of the embeddings of the
experts a token did not select (through the layer's :class:`MoekitHyperSelection`) and the
layer's embedding; it is generated once per distinct set of selected experts in the batch.

Attention experts run as one attention call with E x heads query heads. With per-expert KV the
experts' key/value heads are concatenated (E x kv heads), so grouped-query attention pairs each
expert's query heads with its own KV heads, and the cache holds every expert's keys in the layer's
one slot. With shared KV, query heads are ordered (kv head, expert, group member) so each KV head
serves its group in every expert. Soft routing computes every expert; top-k masks the others'
weights (the same compute).
"""

from __future__ import annotations

import copy
import importlib
import types
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin

try:  # transformers 5
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
except ImportError:  # pragma: no cover
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING
try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover
    from transformers.integrations import ALL_ATTENTION_FUNCTIONS
try:  # transformers 5
    from transformers.utils.output_capturing import OutputRecorder
except ImportError:  # transformers 4.57
    try:
        from transformers.utils.generic import OutputRecorder
    except ImportError:  # pragma: no cover
        OutputRecorder = None

from .configuration_moekit_moe import MoekitMoeConfig

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _family_module(base_model_type: str) -> Any:
    """The base family's modeling module (its RoPE and eager attention functions)."""
    return importlib.import_module(f"transformers.models.{base_model_type}.modeling_{base_model_type}")


def _base_classes(config: MoekitMoeConfig) -> tuple[type, type]:
    """The base family's (backbone, causal-LM) classes."""
    base_config_class = type(config.base_config())
    return MODEL_MAPPING[base_config_class], MODEL_FOR_CAUSAL_LM_MAPPING[base_config_class]


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


class _ZeroInitLinear(nn.Linear):
    """A linear layer that starts at zero (weights and bias): the output side of HyperMoE's adapter generator."""


class MoekitHyperNetwork(nn.Module):
    """HyperMoE's hypernetwork (Zhao et al. 2024), one for all layers.

    Input: a selection embedding [S, d_e] (from the experts a token did *not* select) and the
    layer's embedding. Output: the weights of S bottleneck adapters, hidden -> adapter -> hidden
    with a ReLU: down [S, a, H] and its bias [S, a], up [S, H, a] and its bias [S, H]. The up side
    is generated by zero-initialised heads, so every adapter is exactly zero until trained.
    """

    def __init__(self, hidden_size: int, layers: int, embed_dim: int, adapter_dim: int, hyper_dim: int) -> None:
        super().__init__()
        self.hidden_size, self.adapter_dim = hidden_size, adapter_dim
        self.layer_embeddings = nn.Parameter(torch.empty(layers, embed_dim))
        self.trunk = nn.Linear(2 * embed_dim, hyper_dim)
        self.down_weight = nn.Linear(hyper_dim, adapter_dim * hidden_size)
        self.down_bias = nn.Linear(hyper_dim, adapter_dim)
        self.up_weight = _ZeroInitLinear(hyper_dim, hidden_size * adapter_dim)
        self.up_bias = _ZeroInitLinear(hyper_dim, hidden_size)

    def forward(self, selection: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
        sets = selection.shape[0]
        layer_embedding = self.layer_embeddings[layer].expand(sets, -1)
        hidden = F.relu(self.trunk(torch.cat([selection, layer_embedding], dim=-1)))
        hidden_size, adapter = self.hidden_size, self.adapter_dim
        return (
            self.down_weight(hidden).view(sets, adapter, hidden_size),
            self.down_bias(hidden),
            self.up_weight(hidden).view(sets, hidden_size, adapter),
            self.up_bias(hidden),
        )


class MoekitHyperSelection(nn.Module):
    """HyperMoE's per-layer part: an embedding per expert and the MLP that turns the sum of the unselected
    experts' embeddings into the hypernetwork's input."""

    def __init__(self, experts: int, embed_dim: int) -> None:
        super().__init__()
        self.expert_embeddings = nn.Parameter(torch.empty(experts, embed_dim))
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, selected: torch.Tensor) -> torch.Tensor:
        """[S, E] bool (each distinct selected set) -> [S, d_e]."""
        unselected = (~selected).to(self.expert_embeddings.dtype)
        return self.mlp(unselected @ self.expert_embeddings)


class MoekitSparseMoeBlock(nn.Module):
    """Routed FFN experts, each an instance of the base family's MLP class (plus HyperMoE's adapter when enabled)."""

    def __init__(self, config: MoekitMoeConfig, mlp_class: type, layer_idx: int = 0) -> None:
        super().__init__()
        expert_config = copy.copy(config)
        expert_config.intermediate_size = config.moe_intermediate_size or config.intermediate_size
        self.gate = MoekitRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok)
        self.experts = nn.ModuleList([mlp_class(expert_config) for _ in range(config.num_local_experts)])
        self.layer_idx = layer_idx
        self.hyper: MoekitHyperSelection | None = None  # HyperMoE (config.hypermoe): this layer's part
        self._hypernet: list[MoekitHyperNetwork] = []  # the model's shared hypernetwork (not registered here)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, weights, indices = self.gate(flat)
        # each expert's output in the model's dtype, the weighted sum in fp32 and rounded once (identical experts
        # then give the dense FFN's output exactly, in bf16 too)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for expert in torch.unique(indices).tolist():
            rows, slot = torch.where(indices == expert)
            produced = self.experts[expert](flat[rows]).float() * weights[rows, slot, None]
            out.index_add_(0, rows, produced)
        if self.hyper is not None:
            out += self._hyper_output(flat, indices)
        return out.to(flat.dtype).reshape(shape)

    def _hyper_output(self, flat: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """HyperMoE's adapter output [N, H] (fp32): one adapter per distinct set of selected experts.

        A token's adapter depends only on which experts it selected, so the hypernetwork runs once
        per distinct set in the batch (at most C(E, k)) and each adapter is applied to its set's
        tokens, rather than generating 2 H a adapter weights per token.
        """
        selected = torch.zeros(flat.shape[0], self.gate.num_experts, dtype=torch.bool, device=flat.device)
        selected.scatter_(1, indices, True)
        sets, token_set = torch.unique(selected, dim=0, return_inverse=True)
        down, down_bias, up, up_bias = self._hypernet[0](self.hyper(sets), self.layer_idx)
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        for index in range(sets.shape[0]):
            rows = torch.where(token_set == index)[0]
            inner = F.relu(F.linear(flat[rows], down[index], down_bias[index]))
            out.index_add_(0, rows, F.linear(inner, up[index], up_bias[index]).float())
        return out


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


class MoekitMoePreTrainedModel(PreTrainedModel):
    """Weight initialisation and capabilities shared by moekit_moe models."""

    config_class = MoekitMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, _ZeroInitLinear):  # HyperMoE's adapter output side: zero, so step 0 is the MoE
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, MoekitHyperNetwork):  # after its children (nn.Module.apply order)
            module.layer_embeddings.normal_(0.0, std)
            # like LoRA's A: the generated down projection starts as a random projection of scale 1/sqrt(H)
            module.down_weight.bias.normal_(0.0, module.hidden_size**-0.5)
        elif isinstance(module, MoekitHyperSelection):
            module.expert_embeddings.normal_(0.0, std)
        elif isinstance(module, (ExpertLinear, _Router)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        else:
            super()._init_weights(module)


class MoekitMoeForCausalLM(MoekitMoePreTrainedModel, GenerationMixin):
    """The base family's causal LM with moekit's MoE blocks in every decoder layer."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_5 else ["lm_head.weight"]
    if OutputRecorder is not None:
        _can_record_outputs = {
            "router_logits": OutputRecorder(MoekitRouter, index=0),
            "attention_router_logits": OutputRecorder(MoekitAttentionRouter, index=0),
        }

    def __init__(self, config: MoekitMoeConfig) -> None:
        super().__init__(config)
        backbone, causal_lm = _base_classes(config)
        # the base family's causal-LM forward (logit scaling, loss, logits_to_keep), bound to this model so that
        # its signature is what callers inspect (transformers' generate, cache keyword)
        self.forward = types.MethodType(causal_lm.forward, self)
        self.model = backbone(config)  # the base family's backbone, reading this config as its own
        mlp_class = type(self.model.layers[0].mlp)
        for index, layer in enumerate(self.model.layers):
            if config.attention_experts > 0:
                layer.self_attn = MoekitAttentionExperts(config, layer.self_attn, index)
            layer.mlp = MoekitSparseMoeBlock(config, mlp_class, index)
        self.hypernet: MoekitHyperNetwork | None = None
        if config.hypermoe:
            self._build_hypermoe()
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _build_hypermoe(self) -> None:
        """HyperMoE's modules as ``config.hypermoe`` sizes them: one hypernetwork, each layer's selection part."""
        settings, config = self.config.hypermoe, self.config
        self.hypernet = MoekitHyperNetwork(
            config.hidden_size,
            config.num_hidden_layers,
            settings["embed_dim"],
            settings["adapter_dim"],
            settings["hyper_dim"],
        )
        for layer in self.model.layers:
            layer.mlp.hyper = MoekitHyperSelection(config.num_local_experts, settings["embed_dim"])
            layer.mlp._hypernet = [self.hypernet]

    def enable_hypermoe(self, embed_dim: int = 128, adapter_dim: int = 64, hyper_dim: int = 128) -> None:
        """Add HyperMoE's modules to this (loaded) MoE, initialised so that its output is unchanged.

        The adapters' up projections come from zero-initialised heads, so the model computes
        exactly what it computed before until the new modules are trained.
        """
        if self.config.hypermoe:
            raise ValueError("this model has HyperMoE already")
        self.config.hypermoe = {"embed_dim": embed_dim, "adapter_dim": adapter_dim, "hyper_dim": hyper_dim}
        self._build_hypermoe()
        reference = self.model.layers[0].mlp.gate.weight
        assert self.hypernet is not None
        for module in [self.hypernet, *(layer.mlp.hyper for layer in self.model.layers)]:
            module.to(device=reference.device, dtype=reference.dtype)
            module.apply(self._init_weights)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base family's causal-LM forward (bound per instance in ``__init__``)."""
        raise NotImplementedError  # pragma: no cover


__all__ = ["MoekitMoeForCausalLM", "MoekitMoePreTrainedModel"]
