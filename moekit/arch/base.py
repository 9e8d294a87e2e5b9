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

    Roles: ``router``; ``expert`` (one expert's ``projection``); ``fused_gate_up`` ([E, 2I, H],
    each expert's gate rows then up rows) and ``fused_down`` ([E, H, I]) for targets that store
    experts stacked; ``shared`` (the shared expert's ``projection``) and ``shared_gate``.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    expert: int | None = None
    projection: str | None = None


def row_slice(info: TensorInfo, start: int, rows: int) -> TensorInfo:
    """A view of rows ``start:start+rows`` of a stored tensor (rows are contiguous on disk)."""
    row_bytes = info.nbytes // info.shape[0]
    return replace(info, shape=(rows, *info.shape[1:]), offset=info.offset + start * row_bytes, nbytes=rows * row_bytes)


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
        expert_size_key: config key for each expert's intermediate size.
        extra_config_keys: dense config keys copied besides ``COMMON_CONFIG_KEYS``.
        fixed_config: MoE config values that the "equal experts = dense" invariant needs.
        allowed_bias: regexes (on the part after ``model.layers.<L>.``) of bias tensors the
            target has; any other ``.bias`` tensor in a dense input is refused.
        refused_config_flags: dense config keys that must be false, with the reason.
        shared_expert: the target always has a shared expert (written with down_proj = 0).
        fused_experts: for targets that store all experts of a layer in two stacked tensors,
            their names inside the MoE block: (gate_up [E, 2I, H], down [E, H, I]).
        router_suffix: the router weight's name inside the MoE block.
        memory_block, memory_router: the MoE block and router names of transformers 5's fused
            in-memory layout, which some checkpoints are saved in (see ``moekit.arch.layouts``).
        embed_name: the input embedding tensor (calibration starts from it).
        embedding_multiplier_key: config key of a factor the model applies to its embeddings.
        notes: one line for the model card and ``moekit mix --help``-style listings.
    """

    dense_type: str
    moe_type: str
    moe_architecture: str
    moe_block: str
    expert_projections: dict[str, str] = field(default_factory=dict)
    num_experts_keys: tuple[str, ...] = ("num_local_experts",)
    expert_size_key: str = "intermediate_size"
    extra_config_keys: tuple[str, ...] = ()
    fixed_config: dict[str, Any] = field(default_factory=dict)
    allowed_bias: tuple[str, ...] = ()
    refused_config_flags: dict[str, str] = field(default_factory=dict)
    shared_expert: bool = False
    fused_experts: tuple[str, str] | None = None
    router_suffix: str = "gate.weight"
    memory_block: str = "mlp"
    memory_router: str = "gate.weight"
    embed_name: str = "model.embed_tokens.weight"
    embedding_multiplier_key: str | None = None
    notes: str = ""

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

    def moe_block_tensors(self, layer: int, num_experts: int, ffn_shapes: dict[str, tuple[int, ...]], hidden: int) -> list[MoeTensor]:
        """Every tensor of layer ``layer``'s MoE block, in the order mix writes them."""
        tensors = [MoeTensor(self.router_name(layer), (num_experts, hidden), "router")]
        if self.fused_experts is not None:
            gate_up, down = (f"model.layers.{layer}.{self.moe_block}.{n}" for n in self.fused_experts)
            intermediate = ffn_shapes["gate_proj"][0]
            tensors.append(MoeTensor(gate_up, (num_experts, 2 * intermediate, hidden), "fused_gate_up"))
            tensors.append(MoeTensor(down, (num_experts, hidden, intermediate), "fused_down"))
        else:
            for expert in range(num_experts):
                for proj in DENSE_FFN_PROJECTIONS:
                    tensors.append(MoeTensor(self.expert_name(layer, expert, proj), ffn_shapes[proj], "expert", expert, proj))
        if self.shared_expert:
            for role, name in self.shared_expert_names(layer).items():
                if role == "shared_expert_gate":
                    tensors.append(MoeTensor(name, (1, hidden), "shared_gate"))
                else:
                    tensors.append(MoeTensor(name, ffn_shapes[role], "shared", projection=role))
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
        """Shared-expert tensor names by role (projections and the sigmoid gate)."""
        base = f"model.layers.{layer}.{self.moe_block}"
        names = {p: f"{base}.shared_expert.{p}.weight" for p in DENSE_FFN_PROJECTIONS}
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
        absent = [layer for layer in range(layers) if any(self.dense_ffn_name(layer, p) not in names for p in DENSE_FFN_PROJECTIONS)]
        stored = sorted({int(m.group(1)) for n in names if (m := LAYER_TENSOR.match(n))})
        if absent or (stored and stored[-1] >= layers):
            raise CorruptCheckpointError(
                f"config.json says num_hidden_layers={layers}, but the weights hold layers "
                f"{stored[0] if stored else '-'}..{stored[-1] if stored else '-'}"
                + (f" and layer {absent[0]} has no complete FFN" if absent else "") + ".",
                "The weights and config.json do not belong together: re-save the model, or fix num_hidden_layers.",
            )

    # ----- config ------------------------------------------------------------------------
    def moe_config_kwargs(self, dense: dict[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
        """Keyword arguments for the MoE config class, built from a normalised dense config dict."""
        kwargs = {k: dense[k] for k in COMMON_CONFIG_KEYS + self.extra_config_keys if k in dense}
        head_dim = dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]
        kwargs["head_dim"] = int(head_dim)
        # Each expert is a whole dense FFN. Families with a separate expert size key also keep
        # intermediate_size (their dense-layer FFN size): left out, the library default (e.g.
        # Qwen3-MoE's 6144) would be written and mislead readers that use it.
        kwargs["intermediate_size"] = dense["intermediate_size"]
        kwargs[self.expert_size_key] = dense["intermediate_size"]
        for key in self.num_experts_keys:
            kwargs[key] = num_experts
        kwargs["num_experts_per_tok"] = top_k
        kwargs["output_router_logits"] = False
        kwargs.update(self.fixed_config)
        if self.shared_expert:
            kwargs["shared_expert_intermediate_size"] = dense["intermediate_size"]
        return kwargs
