"""Text data: reading, tokenising (cached), packing into fixed-length blocks, splitting.

This is the shared data layer of ``train``, ``mix --router centroid`` and (later) ``tune``,
``inspect`` and ``eval``. Documents are tokenised with the model's tokenizer, joined with EOS
between documents and cut into blocks of ``block_size`` tokens: packing wastes no compute on
padding, and every block has the same number of predicted tokens, so per-batch mean losses
combine exactly across gradient accumulation and data-parallel ranks.

Data specs: ``.txt`` (one document per file), ``.jsonl`` (one JSON object per line with a text
field), ``.json`` (a list of objects or strings), ``.parquet`` (a text column), directories
(recursively, those suffixes), glob patterns, and Hugging Face datasets written
``hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD]`` (streamed through the ``datasets`` library; ``[:N]``
takes the first N documents, ``#FIELD`` names the text field; needs a reachable hub or cache).

Tokenised streams are cached under a key made of the data's fingerprint (paths, sizes, mtimes),
the tokenizer's fingerprint and the text field, so a second run does not tokenise again.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from moekit.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
HUB_PREFIX = "hf:"
_CACHE_FORMAT = 1  # bump when the tokenised cache layout or packing rules change
_TOKENIZE_BATCH = 256


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
        raise DataError(f"Data path {text} does not exist.", "Check the path (files, directories, globs and hf:NAME work).")
    files = [p for p in paths if p.is_file()]
    if not files:
        raise DataError(f"Data path {text} contains no data files.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    unsupported = [p for p in files if p.suffix not in TEXT_SUFFIXES]
    if unsupported:
        raise DataError(f"Unsupported data file {unsupported[0]}.", f"Use files ending in {', '.join(TEXT_SUFFIXES)}.")
    return files


def absolute_spec(spec: str) -> str:
    """A data spec with local paths made absolute (checked to exist); hf: specs unchanged."""
    if spec.startswith(HUB_PREFIX):
        return spec
    expand_data_paths(spec)  # raises a clear DataError for missing or unsupported data
    return str(Path(spec).absolute())


def _records_text(records: Iterable[Any], path: Path | str, text_field: str) -> Iterator[str]:
    for i, record in enumerate(records):
        if isinstance(record, str):
            yield record
        elif isinstance(record, dict) and isinstance(record.get(text_field), str):
            yield record[text_field]
        else:
            raise DataError(f"Record {i} of {path} has no string field '{text_field}'.", "Set the text field name (--text-field).")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no column '{text_field}' (columns: {', '.join(parquet.schema_arrow.names)}).", "Set --text-field.")
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one local data file."""
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".parquet":
            yield from _parquet_texts(path, text_field)
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                lines = [json.loads(line) for line in handle if line.strip()]
            yield from _records_text(lines, path, text_field)
        else:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            yield from _records_text(loaded if isinstance(loaded, list) else [loaded], path, text_field)
    except DataError:
        raise
    except Exception as exc:  # decoding, JSON and parquet errors all mean "unreadable file"
        raise DataError(f"Cannot read data file {path}: {type(exc).__name__}: {exc}.", "Check that it is UTF-8 text, JSON or parquet.")


_HUB_SPEC = re.compile(r"^hf:(?P<name>[^:@#\[]+)(?::(?P<config>[^@#\[]+))?(?:@(?P<split>[^#\[]+))?(?:\[:(?P<limit>\d+)\])?(?:#(?P<field>.+))?$")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str, int | None, str | None]:
    """'hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD]' -> (name, config, split, first N documents, text field)."""
    match = _HUB_SPEC.match(spec)
    if match is None:
        raise DataError(
            f"Dataset spec '{spec}' is not understood.",
            "Write hf:NAME[:CONFIG][@SPLIT][[:N]][#FIELD], e.g. hf:wikimedia/wikipedia:20231101.en@train[:100000]#text.",
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
        raise DataError(f"Cannot load dataset {spec}: {type(exc).__name__}: {exc}.", "Check the name, config and split, and that the hub is reachable.")
    yield from _records_text(dataset, spec, field or text_field)


def iter_spec_documents(spec: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a data spec (local files, directories, globs or hf:NAME)."""
    if str(spec).startswith(HUB_PREFIX):
        yield from _hub_texts(str(spec), text_field)
        return
    for path in expand_data_paths(spec):
        yield from iter_documents(path, text_field)


def tokenizer_fingerprint_of(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{payload}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def spec_fingerprint(spec: str | Path, text_field: str) -> str:
    """Identify a data spec's content cheaply: file paths, sizes and modification times."""
    if str(spec).startswith(HUB_PREFIX):
        parts = [str(spec)]
    else:
        parts = [f"{p.absolute()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in expand_data_paths(spec)]
    return hashlib.sha256("\n".join([*parts, text_field]).encode()).hexdigest()


def tokenize_documents(tokenizer: Any, documents: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise documents (in batches) and join them with EOS into a 1-D int32 tensor.

    Ids are kept as int32 tensors per batch (4 bytes a token, not a Python int's ~30), and the
    stream stops after ``max_tokens`` if given.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    parts: list[torch.Tensor] = []
    count = 0
    batch: list[str] = []

    def flush() -> int:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        batch.clear()
        flat = torch.tensor([token for ids in encoded for token in (*ids, *eos)], dtype=torch.int32)
        parts.append(flat)
        return flat.numel()

    for doc in documents:
        if doc.strip():
            batch.append(doc)
        if len(batch) >= _TOKENIZE_BATCH:
            count += flush()
            if max_tokens is not None and count >= max_tokens:
                break
    if batch and (max_tokens is None or count < max_tokens):
        flush()
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    return stream[:max_tokens] if max_tokens is not None else stream


def _write_cache(cache_file: Path, stream: torch.Tensor) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
    os.close(fd)
    torch.save(stream, tmp)
    os.replace(tmp, cache_file)  # concurrent ranks may race here; each writes the same bytes


def token_stream(
    tokenizer: Any, spec: str | Path, text_field: str = "text", cache_dir: Path | None = None, max_tokens: int | None = None,
    pending: list[tuple[Path, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The token ids of a data spec as one 1-D int32 tensor, from the cache when possible.

    A newly tokenised stream is cached at once, or, with ``pending``, appended there for the
    caller to cache once every check on the data has passed.
    """
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{_CACHE_FORMAT}|{spec_fingerprint(spec, text_field)}|{tokenizer_fingerprint_of(tokenizer)}|{max_tokens}".encode()
        ).hexdigest()[:32]
        cache_file = Path(cache_dir) / f"{key}.pt"
        if cache_file.is_file():
            return torch.load(cache_file, weights_only=True)
    stream = tokenize_documents(tokenizer, iter_spec_documents(spec, text_field), max_tokens)
    if stream.numel() == 0:
        raise DataError(f"Data {spec} contains no text.", "Point to non-empty text files.")
    if cache_file is not None:
        if pending is not None:
            pending.append((cache_file, stream))
        else:
            _write_cache(cache_file, stream)
    return stream


def pack_blocks(stream: torch.Tensor | list[int], block_size: int) -> torch.Tensor:
    """Cut a token stream into a [num_blocks, block_size] tensor, dropping the ragged tail."""
    stream = torch.as_tensor(stream)
    num_blocks = stream.numel() // block_size
    return stream[: num_blocks * block_size].reshape(num_blocks, block_size)


def packed_blocks(stream: torch.Tensor, block_size: int, spec: str | Path) -> torch.Tensor:
    """Pack a stream into blocks; raise DataError if it holds less than one block."""
    if stream.numel() < block_size:
        raise DataError(
            f"Data {spec} has {stream.numel()} tokens, fewer than one block of {block_size}.",
            "Add data or lower --seq-len.",
        )
    return pack_blocks(stream, block_size)


def split_validation(blocks: torch.Tensor, val_fraction: float, spec: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last ``val_fraction`` of the blocks (at least one) for validation."""
    if val_fraction <= 0:
        return blocks, blocks[:0]
    num_val = max(1, round(len(blocks) * val_fraction))
    if num_val >= len(blocks):
        raise DataError(
            f"Data {spec} packs into only {len(blocks)} block(s), too few to hold out a validation split.",
            "Add data, lower --seq-len, pass --val-data, or use --val-fraction 0.",
        )
    return blocks[:-num_val], blocks[-num_val:]


def load_token_blocks(
    tokenizer: Any, spec: str | Path, block_size: int, max_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """Read, tokenise and pack a data spec (no cache); a stream shorter than a block becomes one shorter block."""
    stream = token_stream(tokenizer, spec, text_field, max_tokens=max_tokens).long()
    if stream.numel() < block_size:
        return stream.view(1, -1)
    return pack_blocks(stream, block_size)


def domain_splits(
    tokenizer: Any, data: dict[str, list[str]], val_data: dict[str, list[str]], seq_len: int, val_fraction: float,
    text_field: str = "text", cache_dir: Path | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(train, validation) blocks per domain: ``val_data`` where given, else the last ``val_fraction``.

    Token streams are cached only once every domain has passed its checks (enough tokens for
    the blocks and the split), so refused data leaves no cache behind.
    """
    pending: list[tuple[Path, torch.Tensor]] = []

    def blocks(specs: list[str]) -> torch.Tensor:
        streams = [token_stream(tokenizer, spec, text_field, cache_dir, pending=pending) for spec in specs]
        return packed_blocks(torch.cat(streams), seq_len, ", ".join(specs))

    splits = {}
    for domain, specs in data.items():
        if val_data.get(domain):
            splits[domain] = (blocks(specs), blocks(val_data[domain]))
        else:
            splits[domain] = split_validation(blocks(specs), val_fraction, ", ".join(specs))
    for cache_file, stream in pending:
        _write_cache(cache_file, stream)
    return splits


def mixture_blocks(splits: dict[str, torch.Tensor], ratios: dict[str, float], seed: int = 0) -> torch.Tensor:
    """One block pool in which domain d holds a ``ratios[d]`` share (BTX's tune data mix).

    The pool has as many blocks as all domains together; a domain needing more blocks than it
    has is cycled through (each pass a new seeded order), one needing fewer is subsampled.
    """
    total = sum(len(b) for b in splits.values())
    weight = sum(ratios.values())
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for domain, blocks in splits.items():
        wanted = round(total * ratios[domain] / weight)
        if wanted == 0:  # a zero share (or one too small to round to a block) leaves the domain out
            continue
        passes = -(-wanted // len(blocks))
        order = torch.cat([torch.randperm(len(blocks), generator=generator) for _ in range(passes)])[:wanted]
        parts.append(blocks[order])
    return torch.cat(parts)


def evaluation_blocks(tokenizer: Any, specs: list[str], seq_len: int, max_tokens: int, text_field: str = "text") -> torch.Tensor:
    """Blocks of up to ``max_tokens`` tokens from ``specs`` (for inspect/eval; no cache, no split).

    A stream shorter than one block becomes a single shorter block, so small samples still work.
    """
    stream = torch.cat([token_stream(tokenizer, spec, text_field, max_tokens=max_tokens) for spec in specs])[:max_tokens]
    return stream.view(1, -1) if stream.numel() < seq_len else pack_blocks(stream, seq_len)
