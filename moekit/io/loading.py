"""Loading a Hugging Face causal LM for train, tune, eval and inspect, refusing incomplete checkpoints.

transformers initialises any weight a checkpoint lacks at random and carries on (a config that
names more layers than the weights hold, a truncated shard set): an evaluation or a training run
on such a model gives numbers that mean nothing. moekit loads with the loading info and refuses
a model with missing or mismatched weights, naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.errors import CorruptCheckpointError, InputNotFoundError


def load_causal_lm(model_dir: Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(model_dir)`` in ``dtype``; a clear error if it is not whole."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from moekit.modeling import register

    register()  # moekit's own family loads without trust_remote_code
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputNotFoundError(
            f"{model_dir} is not a model directory (no config.json).",
            "Point to a directory written by save_pretrained (for a run: recreate missing branches with moekit "
            "branch).",
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True, **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:  # unknown type, bad shapes, damage
        reason = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise CorruptCheckpointError(
            f"transformers cannot load {model_dir}: {type(exc).__name__}: {reason}",
            "Check that config.json and the weights belong together and are whole (re-save or re-download the model).",
        )
    missing = sorted(str(k) for k in info.get("missing_keys", ()))
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        example = (missing or mismatched)[0]
        raise CorruptCheckpointError(
            f"{model_dir} does not hold every weight its config.json describes: {len(missing)} missing and "
            f"{len(mismatched)} of the wrong shape (e.g. {example}); they would be initialised at random.",
            "Re-save or re-download the model, or fix config.json (e.g. num_hidden_layers) to match the weights.",
        )
    return model
