"""A model's provenance: ``MODEL_DIR/moekit.yaml``, how moekit made the model in that directory.

Not to be confused with the run manifest (``RUN_DIR/moekit.yaml``, :mod:`moekit.manifest`), which
describes a run directory; the two share the file name in different directories. ``mix`` writes
a record (seed, experts, options); ``tune`` and ``mix --add-expert`` write a record of their own
that keeps the record of the model they started from under ``input``, so the file of a tuned or
grown model is a chain back to the mix. :func:`origin` walks that chain to the first record that
holds a given key (the seed, the experts, the split, the added expert).

Provenance informs; it never blocks a model from loading: an unreadable file reads as None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moekit import __version__
from moekit.manifest import now_iso

PROVENANCE_NAME = "moekit.yaml"


def read_provenance(model_dir: Path) -> dict[str, Any] | None:
    """The provenance record of ``model_dir``, or None when there is none or it cannot be read."""
    path = Path(model_dir) / PROVENANCE_NAME
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return record if isinstance(record, dict) else None


def origin(record: Any, key: str) -> dict[str, Any] | None:
    """The first record in the chain from ``record`` (tune's, add-expert's, mix's) that holds ``key``; None if none
    does."""
    while isinstance(record, dict) and key not in record and isinstance(record.get("input"), dict):
        record = record["input"]
    return record if isinstance(record, dict) and key in record else None


def recorded(model_dir: Path, key: str) -> Any:
    """The value of ``key`` in the nearest record of ``model_dir``'s provenance that has it (None if none has)."""
    found = origin(read_provenance(model_dir), key)
    return None if found is None else found[key]


def expert_names(model_dir: Path) -> list[str] | None:
    """The routed experts' names in order (e.g. ``code``, ``math``, ``seed``; ``code.0``, ``code.1`` under
    ``--split``)."""
    names = recorded(model_dir, "expert_names")
    if isinstance(names, list):
        return [str(n) for n in names]
    experts = recorded(model_dir, "experts")  # records written before expert_names existed
    if isinstance(experts, list) and all(isinstance(e, dict) and "name" in e for e in experts):
        return [str(e["name"]) for e in experts]
    return None


def write_provenance(out_dir: Path, record: dict[str, Any], input_record: dict[str, Any] | None = None) -> None:
    """Write ``out_dir/moekit.yaml``: ``record`` stamped with the moekit version and time, and the
    provenance of the model it was made from under ``input`` (when given)."""
    full = {"moekit_version": __version__, "created": now_iso(), **record}
    if input_record is not None:
        full["input"] = input_record
    (Path(out_dir) / PROVENANCE_NAME).write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")
