"""Reading text data: data specs, documents, and their fingerprints.

Data specs: ``.txt`` (one document per file), ``.jsonl`` (one JSON object per line with a text
field), ``.json`` (a list of objects or strings), ``.parquet`` (a text column), directories
(recursively, those suffixes), glob patterns, and Hugging Face datasets written
``hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD]`` (streamed through the ``datasets`` library; ``[:N]``
takes the first N documents, ``#FIELD`` names the text field; needs a reachable hub or cache).

Everything streams: a ``.jsonl`` file is read line by line, a parquet file batch by batch, and a
large ``.txt`` file (one document) in pieces that end at line ends, so no file of any size is
held in memory at once. :func:`iter_spec_pieces` yields ``(text, ends_document)`` pairs: a
document is one or more pieces, the last one marked.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moekit.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HUB_PREFIX = "hf:"


def expand_data_paths(spec: str | Path) -> list[Path]:
    """Expand a file, directory or glob into a sorted list of data files; raise DataError if none."""
    text = str(spec)
    if any(ch in text for ch in "*?[") and not Path(text).exists():  # a real path with [ ] in its name is not a glob
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).rglob("*") if p.suffix in TEXT_SUFFIXES)
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise DataError(
            f"Data path {text} does not exist.", "Check the path (files, directories, globs and hf:NAME work)."
        )
    files = [p for p in paths if p.is_file()]
    if not files:
        raise DataError(f"Data path {text} contains no data files.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    unsupported = [p for p in files if p.suffix not in TEXT_SUFFIXES]
    if unsupported:
        raise DataError(f"Unsupported data file {unsupported[0]}.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    return files


STORE_META_NAME = "moekit-store.json"  # marks a directory as a prepared token store (moekit prepare)


def spec_paths(specs: Iterable[str | Path]) -> list[Path]:
    """The local files and directories that data specs read (globs expanded; ``hf:`` specs read none): what an
    output must never overwrite."""
    paths: list[Path] = []
    for spec in specs:
        text = str(spec)
        if text.startswith(HUB_PREFIX):
            continue
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            paths += [Path(p) for p in glob.glob(text, recursive=True)]
        elif Path(text).exists():
            paths.append(Path(text))
    return paths


def is_store_dir(spec: str | Path) -> bool:
    """Whether ``spec`` is a directory written by ``moekit prepare``."""
    return not str(spec).startswith(HUB_PREFIX) and (Path(spec) / STORE_META_NAME).is_file()


def absolute_spec(spec: str) -> str:
    """A data spec with local paths made absolute (checked to exist); hf: specs unchanged."""
    if spec.startswith(HUB_PREFIX):
        return spec
    if is_store_dir(spec):
        return str(Path(spec).absolute())
    expand_data_paths(spec)  # raises a clear DataError for missing or unsupported data
    return str(Path(spec).absolute())


def _records_text(records: Iterable[Any], path: Path | str, text_field: str) -> Iterator[str]:
    for i, record in enumerate(records):
        if isinstance(record, str):
            yield record
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            yield record[text_field]
        else:
            raise DataError(
                f"Record {i} of {path} has no string field '{text_field}'.", "Set the text field name (--text-field)."
            )


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{path} has no column '{text_field}' (columns: {', '.join(parquet.schema_arrow.names)}).",
            "Set --text-field.",
        )
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


_TXT_PIECE_CHARS = 8 << 20  # a .txt document is read (and tokenised) in pieces of about this size


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A ``.txt`` file as one document, in pieces that end at a line end (the last one marked).

    Files under ``_TXT_PIECE_CHARS`` are one piece. Larger ones are cut after a newline, where
    byte-level BPEs start a new pre-token anyway, so the ids equal those of the whole text.
    """
    with open(path, encoding="utf-8") as handle:
        buffered = ""
        while True:
            chunk = handle.read(_TXT_PIECE_CHARS)
            buffered += chunk
            if len(chunk) < _TXT_PIECE_CHARS:  # the end of the file
                yield buffered, True
                return
            cut = buffered.rfind("\n") + 1
            if cut > 0:
                yield buffered[:cut], False
                buffered = buffered[cut:]


def _jsonl_records(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def iter_pieces(path: Path, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield ``(text, ends_document)`` pieces of one local data file, streaming."""
    try:
        if path.suffix == ".txt":
            yield from _txt_pieces(path)
            return
        if path.suffix == ".parquet":
            texts: Iterable[str] = _parquet_texts(path, text_field)
        elif path.suffix == ".jsonl":
            texts = _records_text(_jsonl_records(path), path, text_field)
        else:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            texts = _records_text(loaded if isinstance(loaded, list) else [loaded], path, text_field)
        for text in texts:
            yield text, True
    except DataError:
        raise
    except Exception as exc:  # decoding, JSON and parquet errors all mean "unreadable file"
        raise DataError(
            f"Cannot read data file {path}: {type(exc).__name__}: {exc}.",
            "Check that it is UTF-8 text, JSON or parquet.",
        )


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one local data file (a large .txt document is joined from its pieces)."""
    parts: list[str] = []
    for text, ends in iter_pieces(path, text_field):
        parts.append(text)
        if ends:
            yield "".join(parts)
            parts = []


_HUB_SPEC = re.compile(
    r"^hf:(?P<name>[^:@#\[]+)(?::(?P<config>[^@#\[]+))?(?:@(?P<split>[^#\[]+))?(?:\[:(?P<limit>\d+)\])?(?:#(?P<field>.+))?$"
)


def parse_hub_spec(spec: str) -> tuple[str, str | None, str, int | None, str | None]:
    """'hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD]' -> (name, config, split, first N documents, text field)."""
    match = _HUB_SPEC.match(spec)
    if match is None:
        raise DataError(
            f"Dataset spec '{spec}' is not understood.",
            "Write hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD], e.g. "
            "hf:wikimedia/wikipedia:20231101.en@train[:100000]#text.",
        )
    limit = match["limit"]
    return match["name"], match["config"], match["split"] or "train", int(limit) if limit else None, match["field"]


def _hub_texts(spec: str, text_field: str) -> Iterator[str]:
    name, config, split, limit, field = parse_hub_spec(spec)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        if limit is not None:
            dataset = dataset.take(limit)
    except Exception as exc:  # network, auth, missing dataset or config
        raise DataError(
            f"Cannot load dataset {spec}: {type(exc).__name__}: {exc}.",
            "Check the name, config and split, and that the hub is reachable.",
        )
    yield from _records_text(dataset, spec, field or text_field)


def iter_spec_documents(spec: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a data spec (local files, directories, globs or hf:NAME)."""
    if str(spec).startswith(HUB_PREFIX):
        yield from _hub_texts(str(spec), text_field)
        return
    for path in expand_data_paths(spec):
        yield from iter_documents(path, text_field)


def iter_spec_pieces(spec: str | Path, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """Yield ``(text, ends_document)`` pieces of a data spec, streaming (see the module docstring)."""
    if is_store_dir(spec):
        raise DataError(
            f"{spec} is a prepared token store: it holds token ids, not text.", "Give the text data itself here."
        )
    if str(spec).startswith(HUB_PREFIX):
        for text in _hub_texts(str(spec), text_field):
            yield text, True
        return
    for path in expand_data_paths(spec):
        yield from iter_pieces(path, text_field)


def hub_revision(spec: str) -> str | None:
    """The commit of an ``hf:`` dataset as the hub reports it now (None offline or for local data)."""
    if not spec.startswith(HUB_PREFIX) or os.environ.get("HF_HUB_OFFLINE"):
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(parse_hub_spec(spec)[0]).sha
    except Exception:  # offline, private or unknown: the revision is informative only
        return None


def spec_fingerprint(spec: str | Path, text_field: str) -> str:
    """Identify a data spec's content cheaply: file paths, sizes and modification times."""
    if str(spec).startswith(HUB_PREFIX):
        parts = [str(spec)]
    elif is_store_dir(spec):
        parts = ["store:" + str(json.loads((Path(spec) / STORE_META_NAME).read_text(encoding="utf-8")).get("key"))]
    else:
        parts = [f"{p.absolute()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in expand_data_paths(spec)]
    return hashlib.sha256("\n".join([*parts, text_field]).encode()).hexdigest()
