"""Checks that an output directory is a real, portable Hugging Face checkpoint (shared by the format tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.io.checkpoint import SAFETENSORS_DTYPES, Checkpoint

V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend"}


def stored_float_dtypes(model_dir: Path) -> set[torch.dtype]:
    """The dtypes of the floating tensors stored in ``model_dir``."""
    return {
        SAFETENSORS_DTYPES[t.dtype] for t in Checkpoint(model_dir).tensors.values() if t.dtype in ("F32", "F16", "BF16")
    }


def assert_portable_checkpoint(
    model_dir: Path, dtype: torch.dtype, tied: bool, reference_tokenizer: Path | None = None
) -> None:
    """``model_dir`` stores ``dtype`` tensors and says so, keeps a tie tied, and has a tokenizer every reader loads.

    ``reference_tokenizer``: a model directory whose tokenizer.json the output must carry unchanged.

    Also: transformers loads it with empty loading info, and with default arguments in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    assert stored_float_dtypes(model_dir) == {dtype}, (model_dir, stored_float_dtypes(model_dir))
    assert config["dtype"] == name and config["torch_dtype"] == name, (config.get("dtype"), config.get("torch_dtype"))
    tensors = Checkpoint(model_dir).tensors
    if tied:
        assert config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in tensors, "a tied model must not store a separate lm_head"
    else:
        assert "lm_head.weight" in tensors
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("tokenizer_class") not in V5_ONLY_TOKENIZER_CLASSES
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert all(len(v) == 0 for v in info.values()), info
    assert model.dtype == dtype
    if tied:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    AutoTokenizer.from_pretrained(model_dir)  # loads (which class transformers 5 picks depends on the model type)
    if reference_tokenizer is not None:
        # the vocabulary and pipeline travel unchanged (tokenizer.json), so token ids mean the same thing
        assert (model_dir / "tokenizer.json").read_bytes() == (reference_tokenizer / "tokenizer.json").read_bytes()
