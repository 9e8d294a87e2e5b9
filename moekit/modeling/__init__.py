"""moekit's own model family, ``model_type: moekit_moe``, for what no transformers architecture expresses.

``configuration_moekit_moe.py`` and ``modeling_moekit_moe.py`` import only torch and
transformers: ``mix`` copies them into every moekit_moe output (with ``auto_map`` in its
config.json), so plain transformers loads the model with ``trust_remote_code=True``. Inside
moekit, :func:`register` adds the family to transformers' Auto classes, so every command loads
it without that flag. Importing this package registers nothing and imports neither torch nor
transformers.
"""

from __future__ import annotations

from pathlib import Path

MODEL_TYPE = "moekit_moe"
ARCHITECTURE = "MoekitMoeForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_moekit_moe.MoekitMoeConfig",
    "AutoModelForCausalLM": "modeling_moekit_moe.MoekitMoeForCausalLM",
}
_HERE = Path(__file__).resolve().parent
_registered = False


def modeling_files() -> list[Path]:
    """The files a moekit_moe output carries so that transformers can load it on its own."""
    return [_HERE / "configuration_moekit_moe.py", _HERE / "modeling_moekit_moe.py"]


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
