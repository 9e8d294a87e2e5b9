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

from dataclasses import dataclass

from moekit.io.checkpoint import TensorInfo


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
        """The layout whose layer-0 router and experts are all present in ``tensors``, if any."""
        for layout in self.layouts:
            names = [layout.router_name(0)]
            experts = tensors.get(layout.router_name(0))
            if experts is None:
                continue
            names += layout.expert_tensor_names(0, experts.shape[0])
            if all(n in tensors for n in names):
                return layout
        return None


def fused_layout(block: str = "mlp", router: str = "gate.weight") -> ExpertLayout:
    """transformers 5's in-memory (fused) layout with the given block and router names."""
    base = f"model.layers.{{layer}}.{block}"
    return ExpertLayout("fused", f"{base}.{router}", stacked=(f"{base}.experts.gate_up_proj", f"{base}.experts.down_proj"))


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
