"""Architecture adapters, registered by dense ``model_type`` and MoE target.

Adding a family (or a target for a family) is one module that builds an :class:`ArchAdapter`
and calls :func:`register`; list the module in ``_ADAPTER_MODULES`` so it is imported with the
registry. A dense family may have several targets (e.g. llama -> mixtral, glm4_moe,
ernie4_5_moe); the one registered with ``default=True`` is used when ``--target`` is not given.
"""

from __future__ import annotations

import importlib

from moekit.arch.base import ArchAdapter
from moekit.arch.layouts import READ_ONLY_LAYOUTS, READ_ONLY_SCORING, READ_ONLY_SELECTION_BIAS, MoeLayouts
from moekit.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, dict[str, ArchAdapter]] = {}  # dense model_type -> MoE model_type -> adapter
_DEFAULT_TARGET: dict[str, str] = {}
_ADAPTER_MODULES = ("granite", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3", "glm4_moe", "ernie4_5_moe")
_loaded = False


def register(adapter: ArchAdapter, default: bool = True) -> ArchAdapter:
    """Add ``adapter`` under its dense model_type and MoE target (the default target if ``default``); return it."""
    _REGISTRY.setdefault(adapter.dense_type, {})[adapter.moe_type] = adapter
    if default:
        _DEFAULT_TARGET[adapter.dense_type] = adapter.moe_type
    return adapter


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in _ADAPTER_MODULES:
            importlib.import_module(f"moekit.arch.{module}")
        _loaded = True
        # moekit's own family: a target of several families, registered once they are
        importlib.import_module("moekit.arch.moekit_moe").register_all()


def supported_families() -> dict[str, str]:
    """Dense model_type -> its default MoE model_type, for every registered family."""
    _load_all()
    return {k: _DEFAULT_TARGET[k] for k in sorted(_REGISTRY)}


def supported_targets() -> dict[str, list[str]]:
    """Dense model_type -> every MoE model_type it can be mixed into (the default first)."""
    _load_all()
    return {k: sorted(targets, key=lambda t: (t != _DEFAULT_TARGET[k], t)) for k, targets in sorted(_REGISTRY.items())}


def get_adapter(model_type: str, target: str | None = None) -> ArchAdapter:
    """The adapter for a dense ``model_type`` and MoE ``target`` (default: the family's default target).

    Raises a clear error listing what is supported.
    """
    _load_all()
    if model_type not in _REGISTRY:
        listing = ", ".join(f"{d} -> {'/'.join(m)}" for d, m in supported_targets().items())
        raise UnsupportedArchitectureError(
            f"moekit cannot mix models of type '{model_type or '(none)'}'.",
            f"Supported dense families and their targets: {listing}.",
        )
    targets = _REGISTRY[model_type]
    chosen = target or _DEFAULT_TARGET[model_type]
    if chosen not in targets:
        raise UnsupportedArchitectureError(
            f"A {model_type} model cannot be mixed into --target {chosen}.",
            f"Targets for {model_type}: {', '.join(supported_targets()[model_type])}.",
        )
    return targets[chosen]


def adapter_for_moe(moe_type: str) -> ArchAdapter | None:
    """An adapter whose target is ``moe_type``, or None for other models.

    Every adapter of one target shares the MoE-side names, so any of them serves for those.
    """
    _load_all()
    return next((a for targets in _REGISTRY.values() for a in targets.values() if a.moe_type == moe_type), None)


def expert_count_keys(model_type: str) -> tuple[str, ...]:
    """Every config key the readers of MoE ``model_type`` take the expert count from (none for other models)."""
    adapter = adapter_for_moe(model_type)
    return tuple(adapter.num_experts_keys) if adapter is not None else ()


def layouts_for_moe(moe_type: str) -> MoeLayouts | None:
    """Every known on-disk layout of MoE ``moe_type`` (moekit's targets and read-only families), or None."""
    adapter = adapter_for_moe(moe_type)
    if adapter is not None:
        return adapter.layouts()
    return next((entry for entry in READ_ONLY_LAYOUTS if entry.moe_type == moe_type), None)


def router_scoring(moe_type: str) -> str:
    """How an MoE family's routers turn logits into scores: ``softmax`` (most) or ``sigmoid`` (GLM-4.5, DeepSeek-V3)."""
    adapter = adapter_for_moe(moe_type)
    if adapter is not None:
        return adapter.scoring
    return READ_ONLY_SCORING.get(moe_type, "softmax")


def stores_selection_bias(moe_type: str) -> bool:
    """Whether an MoE family's routers add a stored per-expert bias when they choose experts (DeepSeek-V3 style)."""
    adapter = adapter_for_moe(moe_type)
    if adapter is not None:
        return adapter.selection_bias is not None
    return moe_type in READ_ONLY_SELECTION_BIAS


def shared_expert_modules() -> frozenset[str]:
    """The module names a shared expert has inside an MoE block, over every target (``shared_expert``,
    ``shared_experts``)."""
    _load_all()
    return frozenset(
        a.shared.module for targets in _REGISTRY.values() for a in targets.values() if a.shared is not None
    )


def selection_bias_targets() -> dict[str, list[str]]:
    """moekit's targets whose routers store a selection bias, each with the dense families it builds from."""
    _load_all()
    found: dict[str, list[str]] = {}
    for family, targets in sorted(_REGISTRY.items()):
        for name, adapter in targets.items():
            if adapter.selection_bias is not None:
                found.setdefault(name, []).append(family)
    return found


__all__ = [
    "ArchAdapter",
    "MoeLayouts",
    "adapter_for_moe",
    "get_adapter",
    "layouts_for_moe",
    "register",
    "router_scoring",
    "selection_bias_targets",
    "shared_expert_modules",
    "stores_selection_bias",
    "supported_families",
    "supported_targets",
]
