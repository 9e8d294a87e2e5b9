"""Resolve a model given as a local directory or a Hugging Face hub id to a local directory."""

from __future__ import annotations

import re
from pathlib import Path

from moekit.errors import InputNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What moekit needs of a hub repository: weights, configs and tokenizer files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` has the shape of a hub id (org/name)."""
    return bool(_HUB_ID.match(str(source)))


def resolve_model_dir(source: str | Path, revision: str | None = None) -> Path:
    """Return a local directory for ``source``: the directory itself, or a hub snapshot."""
    path = Path(source).expanduser()
    if path.exists():
        return path.absolute()
    if not _HUB_ID.match(str(source)):
        raise InputNotFoundError(
            f"Model {source} not found: there is no such directory.",
            "Check the path, or pass a hub id like org/name.",
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many network/auth error types
        raise InputNotFoundError(
            f"Model {source} is not a local directory and could not be fetched from the hub "
            f"({type(exc).__name__}: {exc}).",
            "Check the id and your network/token, or download it first and pass the local directory.",
        )
