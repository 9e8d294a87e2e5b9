"""The token store: a data spec tokenised once into sharded, memory-mappable token files.

Layout of a store directory (written atomically: built aside, renamed into place):

- ``tokens-00000.bin``, ...: the token ids as raw little-endian ``uint16`` (vocabularies up to
  65,536 ids) or ``uint32``, documents joined with an EOS id after each, shards of at most
  ``shard_tokens`` tokens (a document may continue into the next shard);
- ``documents.bin``: raw ``int64`` end offsets (just past each document's EOS) in store tokens;
- ``moekit-store.json``: format version, dtype, token and document counts, the shards, the
  tokenizer's fingerprint, EOS id and vocabulary size, and the source (spec, content
  fingerprint, text field, hub revision where the hub gives one).

Any file can be opened with ``numpy.memmap(path, dtype, mode="r")``. moekit itself reads with
positioned reads (``os.pread``) of just the bytes a block needs, so reading does not grow the
process's resident memory with mapped pages. Nothing ever holds a corpus in memory.

Tokenisation runs in ``workers`` processes (default: all cores) for tokenizers with a Rust
backend (every "fast" tokenizer): the main process reads and batches the text, each worker
encodes a batch with its own copy of the tokenizer, and at most two batches per worker are in
flight, so memory stays bounded whatever the corpus size. Results are written in input order, so
the store is the same for any number of workers. (With one worker the tokenizer's own Rust
threads still encode each batch in parallel.)
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from moekit import __version__
from moekit.data.encode import (
    encode_in_worker,
    encode_pieces,
    init_worker,
    nonblank_pieces,
    worker_signals_blocked,
)
from moekit.data.sources import (
    STORE_META_NAME,
    hub_revision,
    is_store_dir,
    iter_spec_pieces,
    spec_fingerprint,
)
from moekit.data.store_check import check_meta, check_vocabulary, largest_token_id
from moekit.errors import DataError
from moekit.io.locks import waiting_lock

STORE_FORMAT = 1
STORE_META = STORE_META_NAME
DOCUMENTS_FILE = "documents.bin"
SHARD_TOKENS = 1 << 28  # 256M tokens (512 MB of uint16) per token file
_BATCH_PIECES = 256
_BATCH_CHARS = 4 << 20


# ----- writing -----------------------------------------------------------------------------


def _batches(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Pieces grouped into batches of at most ``_BATCH_PIECES`` pieces or about ``_BATCH_CHARS`` characters."""
    batch: list[tuple[str, bool]] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece[0])
        if len(batch) >= _BATCH_PIECES or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def default_workers() -> int:
    """All the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _all_pieces(specs: list[str | Path], text_field: str) -> Iterator[tuple[str, bool]]:
    for spec in specs:
        yield from iter_spec_pieces(spec, text_field)


def encoded_batches(
    tokenizer: Any, specs: list[str | Path], text_field: str, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(ids, document ends, characters) per batch of the specs' text, in order, tokenised by ``workers`` processes."""
    batches = _batches(nonblank_pieces(_all_pieces(specs, text_field)))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if workers <= 1 or backend is None:
        for batch in batches:
            yield (*encode_pieces(tokenizer, batch), sum(len(t) for t, _ in batch))
        return
    # fork, as torch's DataLoader does on Linux: the workers touch no torch state, and build a
    # fresh tokenizer from its JSON (spawn would re-import the parent's main module)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with worker_signals_blocked():
        pool = context.Pool(workers, initializer=init_worker, initargs=(backend.to_str(), tokenizer.eos_token_id))
    with pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((pool.apply_async(encode_in_worker, (batch,)), sum(len(t) for t, _ in batch)))
            if len(pending) >= 2 * workers:  # bounded: the reader never runs far ahead of the workers
                result, chars = pending.popleft()
                yield (*result.get(), chars)
        while pending:
            result, chars = pending.popleft()
            yield (*result.get(), chars)


class _StoreWriter:
    """Appends token batches to shard files and document ends to documents.bin."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.documents = 0
        self.max_id = -1  # recorded: a reader checks it against its vocabulary without reading the tokens
        self._handle: BinaryIO | None = None
        self._documents = open(directory / DOCUMENTS_FILE, "wb")

    def _open_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self._handle = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def add(self, ids: np.ndarray, ends: np.ndarray) -> None:
        """Append one batch: ``ids``, and ``ends`` (document end offsets relative to the batch)."""
        self._documents.write((ends + self.tokens).astype("<i8").tobytes())
        self.documents += len(ends)
        start = 0
        while start < len(ids):
            if self._handle is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part = ids[start : start + room]
            assert self._handle is not None
            self._handle.write(part.astype(self.dtype.newbyteorder("<")).tobytes())
            self.shards[-1]["tokens"] += len(part)
            start += len(part)
        self.tokens += len(ids)
        self.max_id = max(self.max_id, int(ids.max())) if len(ids) else self.max_id

    def close(self) -> None:
        """Flush and close every file."""
        if self._handle is not None:
            self._handle.close()
        self._documents.close()


def tokenizer_fingerprint_of(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{payload}|eos={tokenizer.eos_token_id}".encode()).hexdigest()


def vocabulary_size(tokenizer: Any) -> int:
    """One more than the largest token id the tokenizer can produce."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer) if hasattr(tokenizer, "__len__") else 0, max(vocab.values(), default=0) + 1)


def store_key(tokenizer: Any, specs: list[str | Path] | str | Path, text_field: str) -> str:
    """The cache key of the store of ``specs``: format, content fingerprints, tokenizer and text field."""
    specs = specs if isinstance(specs, list) else [specs]
    prints = "|".join(spec_fingerprint(spec, text_field) for spec in specs)
    raw = f"{STORE_FORMAT}|{prints}|{tokenizer_fingerprint_of(tokenizer)}|{text_field}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def prepare_store(
    tokenizer: Any,
    specs: list[str | Path] | str | Path,
    out: Path,
    text_field: str = "text",
    workers: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: Any = None,
    force: bool = True,
) -> TokenStore:
    """Tokenise ``specs`` (in order, as one token sequence) into a store at ``out``, atomically; return it opened.

    ``progress(characters)`` is called after each batch when given.
    """
    from moekit.io.outputs import atomic_output_dir

    specs = specs if isinstance(specs, list) else [specs]
    vocab = vocabulary_size(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    with atomic_output_dir(out, "store", force=force) as tmp:
        writer = _StoreWriter(tmp, dtype, shard_tokens)
        try:
            for ids, ends, chars in encoded_batches(tokenizer, specs, text_field, workers or default_workers()):
                writer.add(ids, ends)
                if progress is not None:
                    progress(chars)
        finally:
            writer.close()
        shown = ", ".join(map(str, specs))
        if writer.tokens == 0:
            raise DataError(f"Data {shown} contains no text.", "Point to non-empty text files.")
        meta = {
            "kind": "moekit-token-store",
            "format": STORE_FORMAT,
            "moekit_version": __version__,
            "dtype": dtype.name,
            "tokens": writer.tokens,
            "documents": writer.documents,
            "shards": writer.shards,
            "key": store_key(tokenizer, specs, text_field),
            "tokenizer_fingerprint": tokenizer_fingerprint_of(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": vocab,
            "max_token_id": writer.max_id,
            "text_field": text_field,
            "sources": [
                {
                    "spec": str(spec),
                    "fingerprint": spec_fingerprint(spec, text_field),
                    "revision": hub_revision(str(spec)),
                }
                for spec in specs
            ],
        }
        (tmp / STORE_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return TokenStore(out)


def open_prepared(tokenizer: Any, path: Path) -> TokenStore:
    """A store made by ``moekit prepare``; DataError if another tokenizer made it."""
    store = TokenStore(path)
    if store.meta.get("tokenizer_fingerprint") != tokenizer_fingerprint_of(tokenizer):
        raise DataError(
            f"The token store {path} was prepared with another tokenizer than this model's; its token ids would "
            "mean other things.",
            "Prepare it again with --tokenizer set to this model (or its seed).",
        )
    check_vocabulary(store.path, store.max_token_id, vocabulary_size(tokenizer), "this model's tokenizer")
    return store


def cached_store(
    tokenizer: Any, spec: str | Path, text_field: str, cache_dir: Path, workers: int | None = None
) -> TokenStore:
    """The store of ``spec``: the spec itself when it is a prepared store, else one under ``cache_dir``, prepared now
    if missing (under a lock: jobs of one run, such as the two baselines, share the cache)."""
    if is_store_dir(spec):
        return open_prepared(tokenizer, Path(spec))
    path = Path(cache_dir) / store_key(tokenizer, spec, text_field)
    with waiting_lock(path.parent / f".{path.name}.lock"):
        if path.exists():
            try:
                store = TokenStore(path)
                check_vocabulary(store.path, store.max_token_id, vocabulary_size(tokenizer), "this model's tokenizer")
                return store
            except DataError as exc:  # the cache is moekit's own: the main process prepares a damaged entry again
                if os.environ.get("RANK", "0") != "0":
                    raise
                print(f"warning: {exc.message} Preparing it again.", file=sys.stderr, flush=True)
                shutil.rmtree(path)
        return prepare_store(tokenizer, [spec], path, text_field, workers)


# ----- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shard:
    path: Path
    first: int  # store offset of the shard's first token
    tokens: int


class TokenStore:
    """A prepared store, read with positioned reads; nothing of it is held in memory."""

    def __init__(self, path: Path) -> None:
        self._fds: dict[Path, int] = {}  # first: close() must work whatever fails below
        self.path = Path(path)
        try:
            self.meta: dict[str, Any] = json.loads((self.path / STORE_META).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"{self.path} is not a readable token store ({exc}).",
                "Prepare it again (moekit prepare), or delete it.",
            )
        check_meta(self.path, self.meta, DOCUMENTS_FILE, STORE_FORMAT)
        if self.meta.get("format") != STORE_FORMAT:
            raise DataError(
                f"{self.path} is a token store of format {self.meta.get('format')}; this moekit reads {STORE_FORMAT}.",
                "Prepare the data again with this moekit.",
            )
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        first, self._shards = 0, []
        for shard in self.meta["shards"]:
            self._shards.append(_Shard(self.path / shard["file"], first, int(shard["tokens"])))
            first += int(shard["tokens"])
        self._starts = [s.first for s in self._shards]
        self._largest: int | None = self.meta.get("max_token_id")

    @property
    def num_tokens(self) -> int:
        """Tokens in the store."""
        return int(self.meta["tokens"])

    @property
    def num_documents(self) -> int:
        """Documents in the store."""
        return int(self.meta["documents"])

    @property
    def max_token_id(self) -> int:
        """The largest token id in the store (recorded at prepare time; found once for earlier stores)."""
        if self._largest is None:
            self._largest = largest_token_id(self.read, self.num_tokens)
            self._record_largest()
        return self._largest

    def _record_largest(self) -> None:
        """Keep the scan's result in the metadata of a store written before it was recorded (when it can be written)."""
        from moekit.io.atomic import write_text_atomic

        try:
            write_text_atomic(
                self.path / STORE_META, json.dumps({**self.meta, "max_token_id": self._largest}, indent=1) + "\n"
            )
        except OSError:
            pass  # a read-only store is scanned again next time

    @property
    def key(self) -> str:
        """Identity of the store's content (data fingerprint, tokenizer, text field, format)."""
        return str(self.meta["key"])

    def _pread(self, path: Path, nbytes: int, offset: int) -> bytes:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        data = os.pread(self._fds[path], nbytes, offset)
        if len(data) != nbytes:
            raise DataError(
                f"Token file {path} is shorter than its store says.", "Delete the store and prepare it again."
            )
        return data

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the store as int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens {start}:{stop} of a store of {self.num_tokens}")
        parts = []
        index = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < stop:
            shard = self._shards[index]
            local = position - shard.first
            count = min(stop, shard.first + shard.tokens) - position
            raw = self._pread(shard.path, count * self.dtype.itemsize, local * self.dtype.itemsize)
            parts.append(np.frombuffer(raw, dtype=self.dtype))
            position += count
            index += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def document_end(self, index: int) -> int:
        """End offset (just past the EOS) of document ``index``."""
        return int(np.frombuffer(self._pread(self.path / DOCUMENTS_FILE, 8, index * 8), dtype="<i8")[0])

    def document_end_at_or_before(self, position: int) -> int:
        """The largest document end <= ``position`` (0 if none): a binary search with single reads."""
        low, high = 0, self.num_documents  # invariant: ends[low-1] <= position < ends[high]
        while low < high:
            middle = (low + high) // 2
            if self.document_end(middle) <= position:
                low = middle + 1
            else:
                high = middle
        return self.document_end(low - 1) if low > 0 else 0

    def close(self) -> None:
        """Close the open files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()
