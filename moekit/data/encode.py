"""Turning text pieces into token ids: the part of tokenisation that worker processes run.

Kept free of torch and of the rest of moekit, so a tokenisation worker starts in a fraction of
a second (it imports numpy and the tokenizers library only).
"""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def nonblank_pieces(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
    """Drop blank text before a document's first content: a wholly blank document leaves no tokens and no EOS."""
    in_document = False
    for text, ends in pieces:
        if not in_document and not text.strip():
            continue
        in_document = not ends
        yield text, ends


def encode_pieces(tokenizer: Any, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``pieces`` joined, with EOS after each piece that ends a document, and those documents' end offsets.

    Returns ``(ids int64 [n], doc_ends int64 [documents ended in this batch])``, offsets relative
    to the start of the batch (an end offset points just past the document's EOS).
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"] if pieces else []
    parts: list[list[int]] = []
    ends: list[int] = []
    position = 0
    for ids, (_, ends_document) in zip(encoded, pieces):
        parts.append(ids)
        position += len(ids)
        if ends_document:
            if eos is not None:
                parts.append([eos])
                position += 1
            ends.append(position)
    flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int64, count=position)
    return flat, np.asarray(ends, dtype=np.int64)


_WORKER: dict[str, Any] = {}
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class BackendCall:
    """Calls a ``tokenizers.Tokenizer`` the way transformers' fast tokenizers do (no truncation, no padding)."""

    def __init__(self, tokenizer: Any, eos: int | None) -> None:
        self.tokenizer, self.eos_token_id = tokenizer, eos

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]}


@contextlib.contextmanager
def worker_signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread while worker processes are forked.

    A forked child runs the parent's Python signal handlers until its initialiser replaces them.
    A SIGTERM from ``Pool.terminate`` in that window would raise the CLI's exception inside the
    child, and in the few bytecodes between ``fork()`` and multiprocessing's ``try`` it escapes
    into the parent's call stack: the child then goes on running the parent's program (seen
    under load as a second process training, and "can only join a child process" at exit).
    Children inherit the blocked mask; the pool's own threads, started here, keep it (Python
    handles signals in the main thread only).
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_worker(tokenizer_json: str, eos: int | None) -> None:
    """Process initialiser: default signal handling, and this worker's tokenizer built from its JSON.

    A forked worker inherits the parent's Python signal handlers (the CLI turns SIGTERM into an
    exception); the pool stops its workers with SIGTERM, so they must simply die on it, and leave
    Ctrl-C to the parent. The parent forks them with both signals blocked
    (:func:`worker_signals_blocked`), so one that arrives before this point waits, and is only
    delivered here, under the default handling.
    """
    from tokenizers import Tokenizer

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _WORKER["call"] = BackendCall(tokenizer, eos)


def encode_in_worker(batch: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Encode one batch with the worker's tokenizer."""
    return encode_pieces(_WORKER["call"], batch)
