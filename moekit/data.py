"""Text data: reading local files, tokenising, packing into fixed-length blocks.

This is the shared data layer (``mix --router centroid`` uses it now; ``train``, ``tune``,
``inspect`` and ``eval`` build on it). Documents are tokenised with the model's tokenizer,
joined with EOS between documents and cut into blocks of ``block_size`` tokens: packing wastes
no compute on padding.

Supported inputs: ``.txt`` (one document per file), ``.jsonl`` (one JSON object per line with a
text field), ``.json`` (a list of such objects, or of strings), directories (recursively, those
suffixes) and glob patterns.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moekit.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def expand_data_paths(spec: str | Path) -> list[Path]:
    """Expand a file, directory or glob into a sorted list of data files; raise DataError if none."""
    text = str(spec)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).rglob("*") if p.suffix in TEXT_SUFFIXES)
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise DataError(f"Data path {text} does not exist.", "Check the path (files, directories and globs work).")
    files = [p for p in paths if p.is_file()]
    if not files:
        raise DataError(f"Data path {text} contains no data files.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    unsupported = [p for p in files if p.suffix not in TEXT_SUFFIXES]
    if unsupported:
        raise DataError(f"Unsupported data file {unsupported[0]}.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    return files


def _records_text(records: list[Any], path: Path, text_field: str) -> Iterator[str]:
    for i, record in enumerate(records):
        if isinstance(record, str):
            yield record
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            yield record[text_field]
        else:
            raise DataError(f"Record {i} of {path} has no string field '{text_field}'.", "Set the text field name.")


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one data file."""
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
            yield from _records_text(lines, path, text_field)
        else:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            yield from _records_text(loaded if isinstance(loaded, list) else [loaded], path, text_field)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read data file {path}: {exc}.", "Check that it is UTF-8 text or valid JSON.")


def tokenize_documents(tokenizer: Any, documents: Iterator[str], max_tokens: int | None = None) -> list[int]:
    """Tokenise documents and join them with EOS; stop after ``max_tokens`` tokens if given."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents:
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def pack_blocks(ids: list[int], block_size: int) -> torch.Tensor:
    """Cut a token stream into a [num_blocks, block_size] tensor, dropping the ragged tail."""
    num_blocks = len(ids) // block_size
    return torch.tensor(ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def load_token_blocks(
    tokenizer: Any, spec: str | Path, block_size: int, max_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """Read, tokenise and pack a data spec; a stream shorter than a block becomes one shorter block."""
    documents = (doc for path in expand_data_paths(spec) for doc in iter_documents(path, text_field))
    ids = tokenize_documents(tokenizer, documents, max_tokens)
    if not ids:
        raise DataError(f"Data {spec} contains no text.", "Point to non-empty text files.")
    if len(ids) < block_size:
        return torch.tensor(ids, dtype=torch.long).view(1, -1)
    return pack_blocks(ids, block_size)
