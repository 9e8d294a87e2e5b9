"""Checking a token store before it is read: its metadata, its files, and its token ids against a vocabulary.

A store is written by moekit, but it lives on a disk: a copy can be cut short, a shard lost, the
metadata edited or damaged. Every field the reader relies on is checked when a store is opened
(types, the counts against the file sizes), so damage is a clear "prepare it again" instead of a
traceback deep in a training run; and the largest token id (recorded at prepare time, or found
once for stores of earlier versions) is checked against the vocabulary that will read the ids,
so an id past the embedding never reaches a model (an IndexError on a CPU, a device-side assert
on a GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moekit.errors import DataError

_DTYPES = ("uint16", "uint32")
DOCUMENT_END_BYTES = 8  # documents.bin holds int64 end offsets


def _damaged(path: Path, problem: str) -> DataError:
    return DataError(
        f"The token store {path} is damaged: {problem}.",
        f"Prepare it again (moekit prepare ... --out {path} --force), or delete it (a cached store is prepared again "
        "on the next run).",
    )


def _count(meta: dict[str, Any], key: str, path: Path) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _damaged(path, f"its metadata has no valid {key!r} ({value!r})")
    return value


def check_meta(path: Path, meta: Any, documents_file: str, store_format: int) -> None:
    """Refuse metadata that is not what ``moekit prepare`` writes, or that disagrees with the store's files.

    A store of another format version is left to the caller (it says which versions it reads).
    """
    if not isinstance(meta, dict):
        raise _damaged(path, "its metadata is not a JSON object")
    if meta.get("format") != store_format:
        return
    if meta.get("dtype") not in _DTYPES:
        written = " or ".join(_DTYPES)
        raise _damaged(path, f"its metadata names the token type {meta.get('dtype')!r} (moekit writes {written})")
    itemsize = np.dtype(meta["dtype"]).itemsize
    tokens, documents = _count(meta, "tokens", path), _count(meta, "documents", path)
    for key in ("key", "tokenizer_fingerprint"):
        if not isinstance(meta.get(key), str):
            raise _damaged(path, f"its metadata has no {key!r}")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise _damaged(path, "its metadata lists no shards")
    total = 0
    for shard in shards:
        name, count = shard.get("file"), _count(shard, "tokens", path)
        if not isinstance(name, str) or Path(name).name != name:
            raise _damaged(path, f"its metadata names the shard {name!r}")
        _check_size(path / name, count * itemsize, path)
        total += count
    if total != tokens:
        raise _damaged(path, f"its shards hold {total:,} tokens, its metadata says {tokens:,}")
    _check_size(path / documents_file, documents * DOCUMENT_END_BYTES, path)
    if "max_token_id" in meta:
        _count(meta, "max_token_id", path)


def _check_size(file: Path, expected: int, store: Path) -> None:
    if not file.is_file():
        raise _damaged(store, f"{file.name} is missing")
    actual = file.stat().st_size
    if actual != expected:
        raise _damaged(store, f"{file.name} has {actual:,} bytes, its metadata says {expected:,}")


def largest_token_id(read: Any, tokens: int, chunk: int = 1 << 24) -> int:
    """The largest id of a store read with ``read(start, stop)`` (for stores written before it was recorded)."""
    largest = -1
    for start in range(0, tokens, chunk):
        part = read(start, min(tokens, start + chunk))
        largest = max(largest, int(part.max())) if len(part) else largest
    return largest


def check_vocabulary(path: Path, largest: int, vocabulary: int, whose: str) -> None:
    """Refuse a store whose largest token id is not below ``vocabulary`` (the ids ``whose`` can embed)."""
    if largest >= vocabulary:
        raise DataError(
            f"The token store {path} holds token id {largest}, beyond the {vocabulary:,} ids of {whose}; "
            "the store is damaged or was made for another vocabulary.",
            f"Prepare it again with this model's tokenizer (moekit prepare ... --out {path} --force).",
        )
