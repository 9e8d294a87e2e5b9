"""Where an MoE checkpoint keeps each layer's router and experts, in every layout that is in use.

Reading a third-party MoE tensor by tensor (``inspect``'s static statistics) needs the names of
its routers and experts. Two layouts exist for the same model:

- the **hub** layout, what transformers 4.x wrote, what transformers 5 writes by default and
  what moekit writes: one tensor per expert and projection (Mixtral
  ``block_sparse_moe.experts.E.w1``; Qwen/OLMoE ``mlp.experts.E.gate_proj``), or for GraniteMoE
  stacked ``input_linear``/``output_linear``;
- the **fused** layout, transformers 5's in-memory one, written by
  ``save_pretrained(save_original_format=False)`` and some merging tools: per layer
  ``experts.gate_up_proj`` [E, 2I, H] (each expert's gate rows, then its up rows) and
  ``experts.down_proj`` [E, H, I], router ``mlp.gate.weight`` (GraniteMoE: ``block_sparse_moe``
  and ``router.weight``).

Layouts of moekit's own targets come from their adapters; other families that moekit reads but
does not build (OLMoE, PhiMoE) are declared here as data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moekit.io.checkpoint import TensorInfo

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ExpertLayout:
    """One on-disk layout of a layer's MoE block: name templates with ``{layer}`` (and ``{expert}``).

    Exactly one of ``per_expert`` (projection -> template) and ``stacked`` ((gate_up, down)
    templates of [E, 2I, H] and [E, H, I] tensors) is set.
    """

    name: str
    router: str
    per_expert: dict[str, str] | None = None
    stacked: tuple[str, str] | None = None

    def router_name(self, layer: int) -> str:
        """The router weight [E, H] of ``layer``."""
        return self.router.format(layer=layer)

    def moe_layers(self, tensors: dict[str, TensorInfo]) -> list[int]:
        """The decoder layers that have this layout's router in ``tensors``, in order (dense layers have none)."""
        layers = sorted({int(m.group(1)) for name in tensors if (m := _LAYER_INDEX.match(name))})
        return [layer for layer in layers if self.router_name(layer) in tensors]

    def expert_tensor_names(self, layer: int, experts: int) -> list[str]:
        """Every tensor that holds expert weights in ``layer``."""
        if self.stacked is not None:
            return [t.format(layer=layer) for t in self.stacked]
        assert self.per_expert is not None
        return [t.format(layer=layer, expert=e) for e in range(experts) for t in self.per_expert.values()]


@dataclass(frozen=True)
class MoeLayouts:
    """The layouts one MoE ``model_type`` may be stored in, in the order they are tried."""

    moe_type: str
    layouts: tuple[ExpertLayout, ...]

    def detect(self, tensors: dict[str, TensorInfo]) -> ExpertLayout | None:
        """The layout whose router and experts are all present in ``tensors`` for the first MoE layer, if any.

        The first MoE layer need not be layer 0: GLM-4.5 and DeepSeek-V3 keep their first
        ``first_k_dense_replace`` layers dense.
        """
        for layout in self.layouts:
            layers = layout.moe_layers(tensors)
            if not layers:
                continue
            first = layers[0]
            names = layout.expert_tensor_names(first, tensors[layout.router_name(first)].shape[0])
            if all(n in tensors for n in names):
                return layout
        return None


def fused_layout(block: str = "mlp", router: str = "gate.weight") -> ExpertLayout:
    """transformers 5's in-memory (fused) layout with the given block and router names."""
    base = f"model.layers.{{layer}}.{block}"
    return ExpertLayout(
        "fused", f"{base}.{router}", stacked=(f"{base}.experts.gate_up_proj", f"{base}.experts.down_proj")
    )


def per_expert_layout(block: str, projections: dict[str, str], router: str = "gate.weight") -> ExpertLayout:
    """The hub layout: one tensor per expert and projection (``projections``: dense name -> stored name)."""
    base = f"model.layers.{{layer}}.{block}"
    templates = {p: f"{base}.experts.{{expert}}.{name}.weight" for p, name in projections.items()}
    return ExpertLayout("per-expert", f"{base}.{router}", per_expert=templates)


def stacked_layout(block: str, router: str, gate_up: str, down: str) -> ExpertLayout:
    """A hub layout that stores a layer's experts stacked (GraniteMoE's input_linear/output_linear)."""
    base = f"model.layers.{{layer}}.{block}"
    return ExpertLayout("stacked", f"{base}.{router}", stacked=(f"{base}.{gate_up}", f"{base}.{down}"))


_QWEN_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

# MoE families moekit reads but does not build (no dense adapter targets them).
READ_ONLY_LAYOUTS = (
    MoeLayouts("olmoe", (per_expert_layout("mlp", _QWEN_NAMES), fused_layout())),
    MoeLayouts("phimoe", (per_expert_layout("block_sparse_moe", _MIXTRAL_NAMES), fused_layout("mlp", "router.weight"))),
)

# How the routers of MoE families moekit reads but does not build turn logits into scores
# (families not listed, and moekit's own targets other than those with ``scoring`` set, use softmax).
READ_ONLY_SCORING = {"deepseek_v3": "sigmoid", "dots1": "sigmoid", "solar_open": "sigmoid", "glm4_moe_lite": "sigmoid"}

# Read-only families whose routers carry a selection bias (e_score_correction_bias) at inference.
READ_ONLY_SELECTION_BIAS = frozenset({"deepseek_v3", "dots1", "solar_open", "glm4_moe_lite"})
