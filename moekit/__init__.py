"""moekit: build Mixture-of-Experts models from dense Hugging Face checkpoints (Branch-Train-MiX)."""

__version__ = "0.1.0"
