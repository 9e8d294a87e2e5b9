"""Tokenising text, and small in-memory token samples (for eval, inspect and router calibration).

Documents are tokenised with the model's tokenizer without special tokens, and an EOS id follows
every document, so packed blocks show where documents end. Everything that reads a whole
corpus goes through the token store (``moekit.data.store``); this module's in-memory streams are
for samples bounded by a token budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.data.encode import encode_pieces, nonblank_pieces
from moekit.data.sources import is_store_dir, iter_spec_pieces
from moekit.data.store import open_prepared
from moekit.errors import DataError

TOKENIZE_BATCH = 256  # pieces per tokenizer call


def batched(pieces: Iterable[tuple[str, bool]], size: int = TOKENIZE_BATCH) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces into lists of ``size`` (the last one shorter)."""
    batch: list[tuple[str, bool]] = []
    for piece in pieces:
        batch.append(piece)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_pieces(tokenizer: Any, pieces: Iterable[tuple[str, bool]], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise pieces and join them (EOS after each document) into a 1-D int32 tensor of at most ``max_tokens``."""
    parts, count = [], 0
    for batch in batched(nonblank_pieces(pieces)):
        ids, _ = encode_pieces(tokenizer, batch)
        parts.append(ids.astype(np.int32))
        count += len(ids)
        if max_tokens is not None and count >= max_tokens:
            break
    stream = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int32)
    return stream[:max_tokens] if max_tokens is not None else stream


def tokenize_documents(tokenizer: Any, documents: Iterable[str], max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise whole documents and join them with EOS into a 1-D int32 tensor (at most ``max_tokens``)."""
    return tokenize_pieces(tokenizer, ((doc, True) for doc in documents), max_tokens)


def token_stream(
    tokenizer: Any, spec: str | Path, text_field: str = "text", max_tokens: int | None = None
) -> torch.Tensor:
    """The token ids of a data spec as one in-memory 1-D int32 tensor (for samples: give ``max_tokens``).

    A prepared token store is read directly (its first ``max_tokens`` tokens).
    """
    if is_store_dir(spec):
        store = open_prepared(tokenizer, Path(spec))
        return torch.from_numpy(store.read(0, min(store.num_tokens, max_tokens or store.num_tokens)).astype(np.int32))
    stream = tokenize_pieces(tokenizer, iter_spec_pieces(spec, text_field), max_tokens)
    if stream.numel() == 0:
        raise DataError(f"Data {spec} contains no text.", "Point to non-empty text files.")
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


def load_token_blocks(
    tokenizer: Any, spec: str | Path, block_size: int, max_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """Read, tokenise and pack a data sample (no store); a stream shorter than a block becomes one shorter block."""
    stream = token_stream(tokenizer, spec, text_field, max_tokens=max_tokens).long()
    if stream.numel() < block_size:
        return stream.view(1, -1)
    return pack_blocks(stream, block_size)


def evaluation_blocks(
    tokenizer: Any, specs: list[str], seq_len: int, max_tokens: int, text_field: str = "text"
) -> torch.Tensor:
    """Blocks of up to ``max_tokens`` tokens from ``specs`` (for inspect/eval of given files; no split).

    A stream shorter than one block becomes a single shorter block, so small samples still work.
    """
    stream = torch.cat([token_stream(tokenizer, spec, text_field, max_tokens=max_tokens) for spec in specs])[
        :max_tokens
    ]
    return stream.view(1, -1) if stream.numel() < seq_len else pack_blocks(stream, seq_len)
