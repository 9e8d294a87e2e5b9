"""moekit: build Mixture-of-Experts models from dense Hugging Face checkpoints (Branch-Train-MiX)."""

__version__ = "0.1.0"

from moekit.modeling import register_when_transformers_loads as _register_family

_register_family()  # moekit's own model family (moekit_moe) joins transformers' Auto classes when they load
