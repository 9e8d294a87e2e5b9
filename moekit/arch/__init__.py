"""Architecture adapters, registered by dense ``model_type``.

Adding a family is one module that builds an :class:`ArchAdapter` and calls :func:`register`;
list the module in ``_ADAPTER_MODULES`` so it is imported with the registry.
"""

from __future__ import annotations

import importlib

from moekit.arch.base import ArchAdapter
from moekit.arch.layouts import READ_ONLY_LAYOUTS, MoeLayouts
from moekit.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, ArchAdapter] = {}
_ADAPTER_MODULES = ("granite", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3")
_loaded = False


def register(adapter: ArchAdapter) -> ArchAdapter:
    """Add ``adapter`` to the registry under its dense model_type; return it."""
    _REGISTRY[adapter.dense_type] = adapter
    return adapter


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in _ADAPTER_MODULES:
            importlib.import_module(f"moekit.arch.{module}")
        _loaded = True


def supported_families() -> dict[str, str]:
    """Dense model_type -> MoE model_type for every registered adapter."""
    _load_all()
    return {k: a.moe_type for k, a in sorted(_REGISTRY.items())}


def get_adapter(model_type: str) -> ArchAdapter:
    """The adapter for a dense ``model_type``; raise a clear error listing what is supported."""
    _load_all()
    if model_type not in _REGISTRY:
        listing = ", ".join(f"{d} -> {m}" for d, m in supported_families().items())
        raise UnsupportedArchitectureError(
            f"moekit cannot mix models of type '{model_type or '(none)'}'.",
            f"Supported dense families: {listing}.",
        )
    return _REGISTRY[model_type]


def adapter_for_moe(moe_type: str) -> ArchAdapter | None:
    """An adapter whose target is ``moe_type`` (its MoE-side names), or None for other models."""
    _load_all()
    return next((a for a in _REGISTRY.values() if a.moe_type == moe_type), None)


def layouts_for_moe(moe_type: str) -> MoeLayouts | None:
    """Every known on-disk layout of MoE ``moe_type`` (moekit's targets and read-only families), or None."""
    adapter = adapter_for_moe(moe_type)
    if adapter is not None:
        return adapter.layouts()
    return next((entry for entry in READ_ONLY_LAYOUTS if entry.moe_type == moe_type), None)


__all__ = ["ArchAdapter", "MoeLayouts", "adapter_for_moe", "get_adapter", "layouts_for_moe", "register", "supported_families"]
