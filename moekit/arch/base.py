"""The architecture adapter: everything moekit knows about one dense family and its MoE target.

Generic code (mix, inspect, tune) never branches on family names; it asks the adapter that is
registered for the dense ``model_type``. An adapter is mostly data: which MoE ``model_type`` and
class the family maps to, where the FFN and the router live on disk, the expert projection
names, which config keys carry over, and which dense features the target cannot express.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from moekit.arch.layouts import (
    MoeLayouts,
    fused_layout,
    per_expert_layout,
    stacked_layout,
)
from moekit.errors import CorruptCheckpointError, UnsupportedArchitectureError
from moekit.io.checkpoint import TensorInfo

# Dense tensor names are "model.layers.<L>.<rest>"; everything else is a global tensor.
LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Config keys every supported family shares with its MoE target, copied unchanged.
COMMON_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
)

DENSE_FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeTensor:
    """One tensor of a layer's MoE block in the output, with the role that says how to fill it.

    Roles: ``router``; ``selection_bias`` (the per-expert bias loss-free balancing learns);
    ``expert`` (one expert's ``projection``); ``fused_gate_up`` ([E, 2I, H], each expert's gate
    rows then up rows) and ``fused_down`` ([E, H, I]) for targets that store experts stacked;
    ``shared`` (the shared expert's ``projection``) and ``shared_gate``. ``dtype`` overrides the
    output dtype (targets that keep routers in fp32 in memory store them so).
    """

    name: str
    shape: tuple[int, ...]
    role: str
    expert: int | None = None
    projection: str | None = None
    dtype: str | None = None


def row_slice(info: TensorInfo, start: int, rows: int) -> TensorInfo:
    """A view of rows ``start:start+rows`` of a stored tensor (rows are contiguous on disk)."""
    row_bytes = info.nbytes // info.shape[0]
    return replace(info, shape=(rows, *info.shape[1:]), offset=info.offset + start * row_bytes, nbytes=rows * row_bytes)


@dataclass(frozen=True)
class SharedExpertSpec:
    """How a target stores its shared (always-on) expert.

    Attributes:
        module: the shared expert's module inside the MoE block (``shared_expert``, ``shared_experts``).
        gated: Qwen2-MoE style: the output is multiplied by sigmoid(x . w) of a ``shared_expert_gate``.
        mandatory: the target always has one (else it is written only when asked for).
        size_key: config key of the shared expert's FFN width, or None when the width is
            ``expert_size_key`` times ``count_key`` (GLM-4.5, ERNIE 4.5).
        count_key: config key of the number of expert-sized shared experts (set to 0 when absent).
    """

    module: str
    gated: bool = False
    mandatory: bool = True
    size_key: str | None = None
    count_key: str | None = None

    @property
    def gate_value(self) -> float:
        """The weight the target gives the shared expert's output when its gate weight is zero."""
        return 0.5 if self.gated else 1.0  # sigmoid(0)


@dataclass(frozen=True)
class ArchAdapter:
    """Maps one dense family (``dense_type``) to the MoE family ``moe_type``.

    Attributes:
        dense_type: the dense config's ``model_type`` (registry key).
        moe_type: the MoE config's ``model_type``.
        moe_architecture: the MoE class name written to ``architectures``.
        moe_block: module name of the MoE block inside a decoder layer on disk.
        expert_projections: dense FFN projection -> expert projection name on disk.
        num_experts_keys: config keys that hold the number of experts (all are written).
        top_k_key: config key of the number of experts per token.
        expert_size_key: config key for each expert's intermediate size.
        extra_config_keys: dense config keys copied besides ``COMMON_CONFIG_KEYS``.
        fixed_config: MoE config values that the "equal experts = dense" invariant needs.
        rope_overrides: values set inside ``rope_parameters`` (and at the top level, for older readers).
        renamed_config: dense key -> MoE key for values the target names differently.
        allowed_bias: regexes (on the part after ``model.layers.<L>.``) of bias tensors the
            target has; any other ``.bias`` tensor in a dense input is refused.
        refused_config_flags: dense config keys that must be false, with the reason.
        shared: the target's shared expert, if it has one.
        fused_experts: for targets that store all experts of a layer in two stacked tensors,
            their names inside the MoE block: (gate_up [E, 2I, H], down [E, H, I]).
        router_suffix: the router weight's name inside the MoE block.
        scoring: how router logits become scores: ``softmax`` or ``sigmoid`` (GLM-4.5, DeepSeek-V3).
        selection_bias: the per-expert selection bias inside the MoE block (``e_score_correction_bias``),
            added to the scores to choose experts but not to the gate values; None if the target has none.
        selection_bias_rows: the bias is stored as [1, E] (ERNIE 4.5) rather than [E].
        routed_scale_key: config key of a factor the target multiplies the routed experts' gate
            values by (GLM-4.5's ``routed_scaling_factor``); None: scaling goes into the weights.
        fp32_router: the target keeps routers (and the selection bias) in fp32 in memory; they are stored so.
        untied_head: the target's readers need an explicit ``lm_head.weight`` (a tied seed's is written out).
        memory_block, memory_router: the MoE block and router names of transformers 5's fused
            in-memory layout, which some checkpoints are saved in (see ``moekit.arch.layouts``).
        embed_name: the input embedding tensor (calibration starts from it).
        embedding_multiplier_key: config key of a factor the model applies to its embeddings.
        expert_group_keys: config keys (groups, groups kept per token) of group-limited routing
            (DeepSeek-V3's rule; GLM-4.5's ``n_group``/``topk_group``); None if the target has none.
        notes: one line for the model card and ``moekit mix --help``-style listings.
        ships_modeling: the target is moekit's own family: its modeling code goes into every output
            (``auto_map``), and readers load it with ``trust_remote_code=True``.
    """

    dense_type: str
    moe_type: str
    moe_architecture: str
    moe_block: str
    expert_projections: dict[str, str] = field(default_factory=dict)
    num_experts_keys: tuple[str, ...] = ("num_local_experts",)
    top_k_key: str = "num_experts_per_tok"
    expert_size_key: str = "intermediate_size"
    extra_config_keys: tuple[str, ...] = ()
    fixed_config: dict[str, Any] = field(default_factory=dict)
    rope_overrides: dict[str, Any] = field(default_factory=dict)
    renamed_config: dict[str, str] = field(default_factory=dict)
    allowed_bias: tuple[str, ...] = ()
    refused_config_flags: dict[str, str] = field(default_factory=dict)
    shared: SharedExpertSpec | None = None
    fused_experts: tuple[str, str] | None = None
    router_suffix: str = "gate.weight"
    scoring: str = "softmax"
    selection_bias: str | None = None
    selection_bias_rows: bool = False
    routed_scale_key: str | None = None
    fp32_router: bool = False
    untied_head: bool = False
    memory_block: str = "mlp"
    memory_router: str = "gate.weight"
    embed_name: str = "model.embed_tokens.weight"
    embedding_multiplier_key: str | None = None
    expert_group_keys: tuple[str, str] | None = None
    notes: str = ""
    ships_modeling: bool = False

    def expert_groups(self, config: Any) -> tuple[int, int] | None:
        """(groups, groups kept per token) of a config (dict or object) with group-limited routing; None without."""
        if self.expert_group_keys is None:
            return None
        read = config.get if isinstance(config, dict) else (lambda key, default: getattr(config, key, default))
        groups, kept = (int(read(key, 1) or 1) for key in self.expert_group_keys)
        return (groups, kept) if groups > 1 else None

    # ----- names -------------------------------------------------------------------------
    def dense_ffn_name(self, layer: int, projection: str) -> str:
        """On-disk name of a dense FFN projection weight."""
        return f"model.layers.{layer}.mlp.{projection}.weight"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        """On-disk (per-expert hub layout) name of expert ``expert``'s projection weight."""
        proj = self.expert_projections[projection]
        return f"model.layers.{layer}.{self.moe_block}.experts.{expert}.{proj}.weight"

    def router_name(self, layer: int) -> str:
        """On-disk name of layer ``layer``'s router weight [num_experts, hidden]."""
        return f"model.layers.{layer}.{self.moe_block}.{self.router_suffix}"

    def selection_bias_name(self, layer: int) -> str | None:
        """On-disk name of layer ``layer``'s selection bias, if the target has one."""
        return None if self.selection_bias is None else f"model.layers.{layer}.{self.moe_block}.{self.selection_bias}"

    def moe_block_tensors(
        self,
        layer: int,
        num_experts: int,
        expert_shapes: dict[str, tuple[int, ...]],
        hidden: int,
        shared_shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> list[MoeTensor]:
        """Every tensor of layer ``layer``'s MoE block, in the order mix writes them.

        ``expert_shapes``: each routed expert's projection shapes; ``shared_shapes``: the shared
        expert's (None: the block has none).
        """
        router_dtype = "F32" if self.fp32_router else None
        tensors = [MoeTensor(self.router_name(layer), (num_experts, hidden), "router", dtype=router_dtype)]
        bias = self.selection_bias_name(layer)
        if bias is not None:
            tensors.append(
                MoeTensor(
                    bias,
                    (1, num_experts) if self.selection_bias_rows else (num_experts,),
                    "selection_bias",
                    dtype="F32",
                )
            )
        if self.fused_experts is not None:
            gate_up, down = (f"model.layers.{layer}.{self.moe_block}.{n}" for n in self.fused_experts)
            intermediate = expert_shapes["gate_proj"][0]
            tensors.append(MoeTensor(gate_up, (num_experts, 2 * intermediate, hidden), "fused_gate_up"))
            tensors.append(MoeTensor(down, (num_experts, hidden, intermediate), "fused_down"))
        else:
            for expert in range(num_experts):
                for proj in DENSE_FFN_PROJECTIONS:
                    tensors.append(
                        MoeTensor(self.expert_name(layer, expert, proj), expert_shapes[proj], "expert", expert, proj)
                    )
        if shared_shapes is not None:
            for role, name in self.shared_expert_names(layer).items():
                if role == "shared_expert_gate":
                    tensors.append(MoeTensor(name, (1, hidden), "shared_gate"))
                else:
                    tensors.append(MoeTensor(name, shared_shapes[role], "shared", projection=role))
        return tensors

    def layouts(self) -> MoeLayouts:
        """The on-disk layouts of this adapter's MoE target: moekit's own (hub) first, then fused."""
        if self.fused_experts is not None:
            hub = stacked_layout(self.moe_block, self.router_suffix, *self.fused_experts)
        else:
            hub = per_expert_layout(self.moe_block, self.expert_projections, self.router_suffix)
        return MoeLayouts(self.moe_type, (hub, fused_layout(self.memory_block, self.memory_router)))

    def dense_views(self, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The dense tensors under the names generic code expects (q/k/v_proj, gate/up/down_proj).

        Families that store fused projections override this to expose row slices; the default
        is the stored layout unchanged.
        """
        return tensors

    def shared_expert_names(self, layer: int) -> dict[str, str]:
        """Shared-expert tensor names by role (projections, and the sigmoid gate of gated ones)."""
        assert self.shared is not None
        base = f"model.layers.{layer}.{self.moe_block}"
        names = {p: f"{base}.{self.shared.module}.{p}.weight" for p in DENSE_FFN_PROJECTIONS}
        if self.shared.gated:
            names["shared_expert_gate"] = f"{base}.shared_expert_gate.weight"
        return names

    def is_ffn_tensor(self, rest: str) -> bool:
        """Whether a per-layer tensor (name after ``model.layers.<L>.``) belongs to the dense FFN."""
        return rest.startswith("mlp.")

    # ----- checks ------------------------------------------------------------------------
    def check_dense(self, config: dict[str, Any], tensor_names: list[str]) -> None:
        """Raise UnsupportedArchitectureError if the dense model uses what the target lacks."""
        for key, reason in self.refused_config_flags.items():
            if config.get(key):
                raise UnsupportedArchitectureError(
                    f"The {self.dense_type} model sets {key}=true, but {self.moe_type} {reason}.",
                    "Only models without that feature can be mixed into this target.",
                )
        for name in tensor_names:
            match = LAYER_TENSOR.match(name)
            rest = match.group(2) if match else name
            if name.endswith(".bias") and not any(re.fullmatch(p, rest) for p in self.allowed_bias):
                raise UnsupportedArchitectureError(
                    f"The {self.dense_type} model has a bias tensor {name}, which {self.moe_type} "
                    "has no place for; mixing would silently drop it and change the model.",
                    "Only bias-free models (or biases the target supports) can be mixed.",
                )
        missing = [p for p in DENSE_FFN_PROJECTIONS if self.dense_ffn_name(0, p) not in tensor_names]
        if missing:
            raise UnsupportedArchitectureError(
                f"The {self.dense_type} model lacks the expected FFN tensors ({', '.join(missing)} in layer 0).",
                "moekit expects gate_proj/up_proj/down_proj MLPs as Hugging Face writes them.",
            )
        names = set(tensor_names)
        layers = config.get("num_hidden_layers")
        if not isinstance(layers, int):
            return
        absent = [
            layer
            for layer in range(layers)
            if any(self.dense_ffn_name(layer, p) not in names for p in DENSE_FFN_PROJECTIONS)
        ]
        stored = sorted({int(m.group(1)) for n in names if (m := LAYER_TENSOR.match(n))})
        if absent or (stored and stored[-1] >= layers):
            raise CorruptCheckpointError(
                f"config.json says num_hidden_layers={layers}, but the weights hold layers "
                f"{stored[0] if stored else '-'}..{stored[-1] if stored else '-'}"
                + (f" and layer {absent[0]} has no complete FFN" if absent else "")
                + ".",
                "The weights and config.json do not belong together: re-save the model, or fix num_hidden_layers.",
            )

    # ----- config ------------------------------------------------------------------------
    def moe_config_kwargs(
        self,
        dense: dict[str, Any],
        num_experts: int,
        top_k: int,
        expert_size: int | None = None,
        shared_size: int | None = None,
        routed_scale: float = 1.0,
    ) -> dict[str, Any]:
        """Keyword arguments for the MoE config class, built from a normalised dense config dict.

        ``expert_size``: each routed expert's FFN width (default: the dense FFN's; smaller with
        ``mix --split``). ``shared_size``: the shared expert's width (None: no shared expert).
        ``routed_scale``: the factor on routed gate values, for targets with ``routed_scale_key``.
        """
        kwargs = {k: dense[k] for k in COMMON_CONFIG_KEYS + self.extra_config_keys if k in dense}
        for source, target in self.renamed_config.items():
            if source in dense:
                kwargs[target] = dense[source]
        head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
        kwargs["head_dim"] = int(head_dim)
        # Each expert is a whole dense FFN (or a 1/C slice of one). Families with a separate
        # expert size key also keep intermediate_size (their dense-layer FFN size): left out, the
        # library default (e.g. Qwen3-MoE's 6144) would be written and mislead readers that use it.
        kwargs["intermediate_size"] = dense["intermediate_size"]
        kwargs[self.expert_size_key] = expert_size or dense["intermediate_size"]
        for key in self.num_experts_keys:
            kwargs[key] = num_experts
        kwargs[self.top_k_key] = top_k
        kwargs["output_router_logits"] = False
        kwargs.update(self.fixed_config)
        if self.rope_overrides:
            kwargs["rope_parameters"] = {**(kwargs.get("rope_parameters") or {}), **self.rope_overrides}
            kwargs.update(self.rope_overrides)  # top-level copies for transformers 4.x readers
        if self.routed_scale_key is not None:
            kwargs[self.routed_scale_key] = routed_scale
        if self.shared is not None:
            if self.shared.size_key is not None:
                kwargs[self.shared.size_key] = shared_size or dense["intermediate_size"]
            if self.shared.count_key is not None:
                kwargs[self.shared.count_key] = (shared_size or 0) // kwargs[self.expert_size_key]
        if self.untied_head:
            kwargs["tie_word_embeddings"] = False
        return kwargs

    def dense_row_order(self, name: str, config: dict[str, Any]) -> list[int] | None:
        """A row permutation the target needs for dense tensor ``name`` (None: rows as stored).

        Families whose attention rotates other dimension pairs than the dense model's (ERNIE
        4.5's interleaved RoPE) reorder the q/k projection rows here; attention scores are
        unchanged because q and k get the same permutation.
        """
        return None
