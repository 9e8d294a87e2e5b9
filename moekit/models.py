"""Opening and validating the dense models that steps consume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.arch import ArchAdapter, get_adapter
from moekit.errors import DataError, InputNotFoundError, InvalidOptionError
from moekit.io.checkpoint import Checkpoint
from moekit.io.files import tokenizer_fingerprint


def open_dense_model(
    path: Path, need_tokenizer: bool = True, target: str | None = None
) -> tuple[Checkpoint, ArchAdapter]:
    """Open a dense HF model directory, check it is complete and mixable, return it and its adapter.

    Checks: config.json, readable safetensors headers for every shard, a tokenizer (if
    ``need_tokenizer``), a supported family and ``target``, and no features the MoE target lacks.
    """
    checkpoint = Checkpoint(path)
    adapter = get_adapter(checkpoint.model_type, target)
    checkpoint.apply_views(adapter.dense_views(checkpoint.config, checkpoint.tensors))
    adapter.check_dense(checkpoint.config, list(checkpoint.tensors))
    if need_tokenizer and not tokenizer_fingerprint(checkpoint.path):
        raise InputNotFoundError(
            f"{checkpoint.path} has no tokenizer files (tokenizer.json, tokenizer.model or vocab files).",
            "Save the tokenizer next to the model: AutoTokenizer.from_pretrained(...).save_pretrained(dir).",
        )
    return checkpoint, adapter


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved with a model; InputNotFoundError (not transformers' misleading advice to install
    sentencepiece) when the directory holds no tokenizer files, or they cannot be read."""
    from transformers import AutoTokenizer

    if Path(model_dir).is_dir() and not tokenizer_fingerprint(Path(model_dir)):
        raise InputNotFoundError(
            f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer.model or vocab files).",
            "Give the model whose tokenizer to use (the seed), or save its tokenizer next to it: "
            "AutoTokenizer.from_pretrained(...).save_pretrained(dir).",
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputNotFoundError(
            f"The tokenizer of {model_dir} cannot be loaded ({reason}).",
            "Save a working tokenizer next to the model (AutoTokenizer.save_pretrained).",
        ) from exc


def context_length(model_dir: Path) -> int | None:
    """The model's context (``max_position_embeddings``), or None when config.json does not say (or is unreadable:
    that is reported where the model is loaded)."""
    import json

    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_context_length(model_dirs: list[Path], settings: Any, option: str = "--seq-len") -> None:
    """Fit ``settings.seq_len`` (a config with that field) to the shortest context of ``model_dirs``.

    A default that is longer becomes the context, said once on stderr; a value the user gave
    (in ``settings.model_fields_set``) that is longer is refused, as :func:`check_context_length` does.
    """
    from moekit.progress import notice

    limits = [(limit, path) for path in model_dirs if (limit := context_length(path)) is not None]
    if not limits or settings.seq_len <= min(limits)[0]:
        return
    limit, path = min(limits)
    if "seq_len" in settings.model_fields_set:
        check_context_length(path, settings.seq_len, option)
    notice(
        f"{option} defaults to {settings.seq_len}, longer than the context of {path} ({limit} positions): "
        f"using {option} {limit}."
    )
    settings.seq_len = limit


def check_context_length(model_dir: Path, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse blocks longer than the model's context (``max_position_embeddings``): positions past it were
    never trained, and the numbers would say little about the model."""
    limit = context_length(model_dir)
    if limit is not None and seq_len > limit:
        raise InvalidOptionError(
            f"{option} {seq_len} is longer than the context of {model_dir} ({limit} positions, "
            "max_position_embeddings).",
            f"Use {option} {limit} or less.",
        )


def check_token_ids(largest: int, model: Any, what: str) -> None:
    """Refuse data whose largest token id the model cannot embed (an IndexError on a CPU, a device-side assert on a
    GPU)."""
    rows = model.get_input_embeddings().num_embeddings
    if largest >= rows:
        raise DataError(
            f"{what} holds token id {largest}, but the model embeds only {rows:,} ids: the data was tokenised for "
            "another vocabulary, or is damaged.",
            "Prepare the data again with this model's tokenizer (or give the model the data was prepared for).",
        )


def check_model_dir(path: Path, what: str, hint: str = "Restore it, or recreate the run with moekit branch.") -> None:
    """Refuse a missing model directory (e.g. a deleted branch) with a message that names it."""
    if not (Path(path) / "config.json").is_file():
        raise InputNotFoundError(f"{what} {path} is missing or is not a model directory (no config.json).", hint)
