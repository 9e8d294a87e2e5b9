"""moekit's own model family, ``model_type: moekit_moe``, for what no transformers architecture expresses.

``configuration_moekit_moe.py`` and ``modeling_moekit_moe.py`` import only torch and
transformers: ``mix`` copies them into every moekit_moe output (with ``auto_map`` in its
config.json), so plain transformers loads the model with ``trust_remote_code=True``. Inside
moekit, :func:`register` adds the family to transformers' Auto classes, so every command loads
it without that flag.

``import moekit`` calls :func:`register_when_transformers_loads`: importing moekit stays free of
torch and transformers (``moekit --help`` answers at once), and the family is registered as soon
as transformers' Auto model classes are imported, so ``AutoModelForCausalLM.from_pretrained``
loads moekit_moe outputs in any program that imported moekit.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

MODEL_TYPE = "moekit_moe"
ARCHITECTURE = "MoekitMoeForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_moekit_moe.MoekitMoeConfig",
    "AutoModelForCausalLM": "modeling_moekit_moe.MoekitMoeForCausalLM",
}
_HERE = Path(__file__).resolve().parent
_registered = False
_AUTO_MODELS = "transformers.models.auto.modeling_auto"  # the module that defines AutoModelForCausalLM


def modeling_files() -> list[Path]:
    """The files a moekit_moe output carries so that transformers can load it on its own."""
    return [_HERE / "configuration_moekit_moe.py", _HERE / "layers_moekit_moe.py", _HERE / "modeling_moekit_moe.py"]


def register() -> None:
    """Register moekit_moe with transformers' AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.modeling.configuration_moekit_moe import MoekitMoeConfig
    from moekit.modeling.modeling_moekit_moe import MoekitMoeForCausalLM

    AutoConfig.register(MODEL_TYPE, MoekitMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoekitMoeConfig, MoekitMoeForCausalLM, exist_ok=True)
    _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' Auto-model module as usual, and registers moekit_moe right after it has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _AUTO_MODELS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_when_transformers_loads() -> None:
    """Register moekit_moe now if transformers' Auto models are loaded, else as soon as they are (idempotent)."""
    if _AUTO_MODELS in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
