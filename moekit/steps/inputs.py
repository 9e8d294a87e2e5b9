"""Opening and validating the dense models that steps consume."""

from __future__ import annotations

from pathlib import Path

from moekit.arch import ArchAdapter, get_adapter
from moekit.errors import InputNotFoundError
from moekit.io.checkpoint import Checkpoint
from moekit.io.files import tokenizer_fingerprint


def open_dense_model(path: Path, need_tokenizer: bool = True) -> tuple[Checkpoint, ArchAdapter]:
    """Open a dense HF model directory, check it is complete and mixable, return it and its adapter.

    Checks: config.json, readable safetensors headers for every shard, a tokenizer (if
    ``need_tokenizer``), a supported family, and no features the MoE target lacks.
    """
    checkpoint = Checkpoint(path)
    adapter = get_adapter(checkpoint.model_type)
    checkpoint.apply_views(adapter.dense_views(checkpoint.config, checkpoint.tensors))
    adapter.check_dense(checkpoint.config, list(checkpoint.tensors))
    if need_tokenizer and not tokenizer_fingerprint(checkpoint.path):
        raise InputNotFoundError(
            f"{checkpoint.path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab files).",
            "Save the tokenizer next to the model: AutoTokenizer.from_pretrained(...).save_pretrained(dir).",
        )
    return checkpoint, adapter
