"""Blocks read from token stores on demand, the held-out split, and domain mixtures without a pool.

A domain's data is one or more stores read as one token sequence. Training reads fixed-length
blocks from a token range of it: block ``i`` of a view over ``[start, stop)`` holds tokens
``start + i*L .. start + (i+1)*L``. Packing wastes no compute on padding, and every block has
the same number of predicted tokens, so per-batch mean losses combine exactly across gradient
accumulation and data-parallel ranks. A view reads only the blocks asked for: each rank reads its
own, and nothing scales with the corpus in memory.

**The held-out split** is a token position: tokens before it train, tokens from it on are
held out. It is chosen once per domain from the data and ``val_fraction`` (the last share of the
tokens, moved to the nearest document end when one is close), recorded in the run manifest,
and reused by every later command whatever its ``--seq-len``: no held-out token is ever inside a
training block.

**Mixtures** (tune, seed pretraining) keep, per position of a virtual pool, only which domain
and which block it holds: two small index arrays (O(blocks) once), never the tokens.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from moekit.data.store import TokenStore
from moekit.errors import DataError


class BlockSource(Protocol):
    """What the training loop reads blocks from."""

    block_size: int

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Blocks ``indices`` as an int64 tensor [len(indices), block_size]."""
        ...

    def fingerprint(self) -> str:
        """Identity of the blocks (for resume checks), from metadata, never from reading the tokens."""
        ...

    @property
    def max_token_id(self) -> int:
        """The largest token id the blocks can hold (from the stores' metadata)."""
        ...


class TokenSequence:
    """Several stores read as one sequence of tokens (a domain's data specs, in order)."""

    def __init__(self, stores: list[TokenStore]) -> None:
        self.stores = stores
        self.starts = list(np.cumsum([0] + [s.num_tokens for s in stores[:-1]]).tolist())
        self.num_tokens = sum(s.num_tokens for s in stores)
        self.key = hashlib.sha256("|".join(s.key for s in stores).encode()).hexdigest()[:32]

    @property
    def max_token_id(self) -> int:
        """The largest token id of the stores."""
        return max((s.max_token_id for s in self.stores), default=-1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` (int64), across stores."""
        parts = []
        index = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            store, offset = self.stores[index], self.starts[index]
            end = min(stop, offset + store.num_tokens)
            parts.append(store.read(start - offset, end - offset))
            start, index = end, index + 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def document_end_at_or_before(self, position: int) -> int:
        """The largest document end (store ends count) that is <= ``position``."""
        index = bisect.bisect_right(self.starts, position) - 1
        offset = self.starts[index]
        inside = self.stores[index].document_end_at_or_before(position - offset)
        return offset + inside


def heldout_start(sequence: TokenSequence, val_fraction: float) -> int:
    """Where the held-out tail of ``sequence`` begins, for ``val_fraction`` of its tokens held out.

    The boundary moves back to a document end when one lies within a quarter of the held-out
    size, so that usually no document is cut in two; a corpus of few long documents is cut at
    the exact token position instead.
    """
    total = sequence.num_tokens
    wanted = round(total * val_fraction)
    if wanted <= 0:
        return total
    target = total - wanted
    boundary = sequence.document_end_at_or_before(target)
    return boundary if 0 < boundary and target - boundary <= wanted // 4 else target


@dataclass
class BlockView:
    """Blocks of ``block_size`` tokens over ``[start, stop)`` of a token sequence, read on demand."""

    sequence: TokenSequence
    start: int
    stop: int
    block_size: int

    def __len__(self) -> int:
        return max(0, (self.stop - self.start) // self.block_size)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Blocks ``indices`` as int64 [n, block_size] (each read with one positioned read per store file it spans)."""
        rows = []
        for index in indices.tolist():
            if not 0 <= index < len(self):
                raise IndexError(f"block {index} of {len(self)}")
            first = self.start + index * self.block_size
            rows.append(self.sequence.read(first, first + self.block_size))
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.block_size, dtype=torch.int64)

    def head(self, count: int) -> torch.Tensor:
        """The first ``count`` blocks (at most all) as one tensor: one read."""
        count = min(count, len(self))
        tokens = self.sequence.read(self.start, self.start + count * self.block_size)
        return torch.from_numpy(tokens).reshape(count, self.block_size)

    @property
    def max_token_id(self) -> int:
        """The largest token id of the sequence the view reads."""
        return self.sequence.max_token_id

    def fingerprint(self) -> str:
        """Identity: the sequence's stores, the token range and the block size."""
        return hashlib.sha256(f"{self.sequence.key}|{self.start}|{self.stop}|{self.block_size}".encode()).hexdigest()[
            :16
        ]


@dataclass
class TensorBlocks:
    """Blocks already in memory (small samples, tests, benchmarks)."""

    blocks: torch.Tensor
    block_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.block_size = int(self.blocks.shape[1])

    def __len__(self) -> int:
        return len(self.blocks)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Blocks ``indices`` as int64."""
        return self.blocks[indices].long()

    def head(self, count: int) -> torch.Tensor:
        """The first ``count`` blocks."""
        return self.blocks[:count].long()

    @property
    def max_token_id(self) -> int:
        """The largest token id of the blocks."""
        return int(self.blocks.max()) if self.blocks.numel() else -1

    def fingerprint(self) -> str:
        """A hash of the tokens (the blocks are small)."""
        return hashlib.sha256(self.blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


class MixtureBlocks:
    """A virtual pool in which domain d holds a ``ratios[d]`` share of the blocks (BTX's tune data mix).

    The pool has as many positions as all domains have blocks together. A domain needing more
    blocks than it has is cycled through (each pass a new seeded order), one needing fewer is
    subsampled. Only two index arrays are built, never the tokens.
    """

    def __init__(self, sources: dict[str, BlockSource], ratios: dict[str, float], seed: int = 0) -> None:
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.block_size = self.sources[0].block_size
        self.ratios, self.seed = ratios, seed
        total = sum(len(s) for s in self.sources)
        weight = sum(ratios.values())
        generator = torch.Generator().manual_seed(seed)
        domains, blocks = [], []
        for index, (name, source) in enumerate(zip(self.names, self.sources)):
            wanted = round(total * ratios[name] / weight)
            if wanted == 0:  # a zero share (or one too small to round to a block) leaves the domain out
                continue
            passes = -(-wanted // len(source))
            dtype = torch.int32 if len(source) < 2**31 else torch.int64  # 4 bytes per block; the same draw as int64
            order = torch.cat([torch.randperm(len(source), generator=generator, dtype=dtype) for _ in range(passes)])[
                :wanted
            ]
            domains.append(torch.full((wanted,), index, dtype=torch.int16))
            blocks.append(order)
        self.domain_of = torch.cat(domains)
        self.block_of = torch.cat(blocks)

    def __len__(self) -> int:
        return len(self.block_of)

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Pool positions ``indices`` as int64 blocks, in order."""
        out = torch.empty(len(indices), self.block_size, dtype=torch.int64)
        domains = self.domain_of[indices]
        for index in domains.unique().tolist():
            where = (domains == index).nonzero().flatten()
            out[where] = self.sources[index].get(self.block_of[indices[where]])
        return out

    @property
    def max_token_id(self) -> int:
        """The largest token id of the sources."""
        return max(s.max_token_id for s in self.sources)

    def fingerprint(self) -> str:
        """The sources, the shares and the seed."""
        parts = [f"{n}:{s.fingerprint()}:{self.ratios[n]}" for n, s in zip(self.names, self.sources)]
        return hashlib.sha256(f"{'|'.join(parts)}|{self.seed}".encode()).hexdigest()[:16]


def require_blocks(view: BlockSource, what: str, hint: str) -> None:
    """DataError unless ``view`` holds at least one block."""
    if len(view) == 0:
        raise DataError(f"{what} holds fewer tokens than one block of {view.block_size}.", hint)
