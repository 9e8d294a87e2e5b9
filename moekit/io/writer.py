"""A sharded safetensors writer that streams tensors straight to disk.

safetensors puts a JSON header with every tensor's offsets before the data, which is why
typical writers keep a whole shard in memory until it is full. moekit knows every output
tensor's name, dtype and shape before computing any of them (they follow from the input
headers), so it plans the shards up front, writes each shard's header first and then appends
each tensor's bytes as soon as it is computed. Peak memory is one tensor, not one shard.

The layout is the standard one: ``model.safetensors`` for a single shard, otherwise
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.io.checkpoint import dtype_code
from moekit.io.floats import stored_dtype


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known before it is computed; ``dtype`` is a torch dtype or a safetensors code ("BF16")."""

    name: str
    dtype: Any
    shape: tuple[int, ...]

    @property
    def code(self) -> str:
        """The safetensors dtype code."""
        return dtype_code(self.dtype)

    @property
    def nbytes(self) -> int:
        """Size in bytes."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count * stored_dtype(self.code).itemsize


@dataclass
class _Shard:
    filename: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[_Shard]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[_Shard] = [_Shard("")]
    filled = 0  # bytes in the last shard (kept as a running sum: summing the shard per tensor is quadratic)
    for tensor in tensors:
        size = tensor.nbytes
        if shards[-1].tensors and filled + size > max_shard_bytes:
            shards.append(_Shard(""))
            filled = 0
        shards[-1].tensors.append(tensor)
        filled += size
    count = len(shards)
    for i, shard in enumerate(shards):
        shard.filename = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
    return shards


def _header_bytes(tensors: list[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class StreamingShardWriter:
    """Write planned tensors, in plan order, into sharded safetensors files in ``out_dir``.

    Every tensor's place in its file is known from the plan, so bytes are written at their
    offset (``pwrite``), not appended. That lets byte-range copies (``copy_ranges``) run on a
    background thread (``copy_workers=1``) while the caller computes the next tensors: the
    in-kernel copies of verbatim experts overlap the averaging of shared tensors. ``close``
    waits for every copy and raises the first failure; calls are still checked against the plan
    in order.
    """

    def __init__(
        self, out_dir: Path, tensors: list[PlannedTensor], max_shard_bytes: int, copy_workers: int = 0
    ) -> None:
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self._queue = [(shard_index, t) for shard_index, s in enumerate(self.shards) for t in s.tensors]
        self._position = 0
        self._fds: list[int] = []
        self._fd = -1
        self._offset = 0  # where the next tensor's bytes go in the open shard
        self._open_shard = -1
        self._pool: Any = None
        self._copies: list[Any] = []
        if copy_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=copy_workers, thread_name_prefix="moekit-copy")

    def write(self, name: str, tensor: Any) -> None:
        """Append the next planned tensor (a torch tensor); its name, dtype and shape must match the plan."""
        self.write_chunks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def write_array(self, name: str, code: str, array: np.ndarray) -> None:
        """Append the next planned tensor given as a numpy array of its stored dtype (BF16: raw uint16)."""
        self.write_chunks(name, code, tuple(array.shape), [array])

    def _next(self, name: str, dtype: Any, shape: tuple[int, ...]) -> PlannedTensor:
        """Check that (name, dtype, shape) is the next planned tensor and open its shard."""
        shard_index, planned = self._queue[self._position]
        if (name, dtype_code(dtype), tuple(shape)) != (planned.name, planned.code, planned.shape):
            raise ValueError(
                f"writer expected {planned.name} {planned.code} {planned.shape}, got {name} {dtype_code(dtype)} "
                f"{tuple(shape)}"
            )
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        return planned

    def _put(self, data: memoryview) -> int:
        """Write ``data`` at the current offset; return its length."""
        _pwrite_all(self._fd, data, self._offset)
        self._offset += len(data)
        return len(data)

    def _copy(self, ranges: list[tuple[Path, int, int]]) -> int:
        """Copy byte ranges to the current offset (on the copy thread when there is one); return their length."""
        total = sum(nbytes for _, _, nbytes in ranges)
        if self._pool is not None:
            self._copies.append(self._pool.submit(copy_ranges_at, ranges, self._fd, self._offset))
        else:
            copy_ranges_at(ranges, self._fd, self._offset)
        self._offset += total
        return total

    def write_chunks(self, name: str, dtype: Any, shape: tuple[int, ...], chunks: Iterable[Any]) -> None:
        """Append the next planned tensor given as consecutive row chunks (dim-0 slices).

        Chunks are torch tensors of the planned dtype, or numpy arrays of its stored dtype (BF16 as
        raw uint16). Lets callers stream a large tensor (an embedding) without holding all of it.
        """
        planned = self._next(name, dtype, shape)
        written = sum(self._put(memoryview(_chunk_bytes(chunk, planned.code, name))) for chunk in chunks)
        if written != planned.nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, planned {planned.nbytes}")
        self._position += 1

    def copy_ranges(
        self, name: str, dtype: Any, shape: tuple[int, ...], ranges: Iterable[tuple[Path, int, int]]
    ) -> None:
        """Append the next planned tensor as byte ranges ``(file, offset, nbytes)`` copied from input files.

        The bytes go file to file in the kernel (``os.copy_file_range``; a plain positioned
        read/write where that is missing or refuses), never through Python buffers: the path for
        expert tensors that mix copies unchanged.
        """
        planned = self._next(name, dtype, shape)
        written = self._copy(list(ranges))
        if written != planned.nbytes:
            raise ValueError(f"{name}: copied {written} bytes, planned {planned.nbytes}")
        self._position += 1

    def write_parts(self, name: str, dtype: Any, shape: tuple[int, ...], parts: Iterable[Any]) -> None:
        """Append the next planned tensor from consecutive parts: byte ranges ``(file, offset, nbytes)`` copied
        file to file, and chunks (numpy arrays of the stored dtype or torch tensors) written from memory.

        ``mix --add-expert`` grows stacked tensors this way: the old experts' bytes are copied, the new
        expert's rows are appended.
        """
        planned = self._next(name, dtype, shape)
        written = 0
        for part in parts:
            if isinstance(part, tuple):
                written += self._copy([part])
            else:
                written += self._put(memoryview(_chunk_bytes(part, planned.code, name)))
        if written != planned.nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, planned {planned.nbytes}")
        self._position += 1

    def _start_shard(self, shard_index: int) -> None:
        shard = self.shards[shard_index]
        # 0o666 less the umask, as open() does
        self._fd = os.open(self.out_dir / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._fds.append(self._fd)  # kept open until close: copies into it may still be running
        self._offset = 0
        self._put(memoryview(_header_bytes(shard.tensors)))
        self._open_shard = shard_index

    def _finish_copies(self) -> None:
        """Wait for every background copy; raise the first failure."""
        copies, self._copies = self._copies, []
        try:
            for future in copies:
                future.result()
        finally:
            for future in copies:
                future.cancel()

    def _close_files(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> None:
        """Finish every shard and write the index; every planned tensor must have been written."""
        if self._position != len(self._queue):
            missing = self._queue[self._position][1].name
            self.abort()
            raise ValueError(f"writer closed before all tensors were written (next: {missing})")
        try:
            self._finish_copies()
        finally:
            self._close_files()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Stop pending copies and close the files without finishing (the atomic output dir removes the rest)."""
        for future in self._copies:
            future.cancel()
        self._copies = []
        self._close_files()


_COPY_BLOCK = 64 << 20


def _chunk_bytes(chunk: Any, code: str, name: str) -> np.ndarray:
    """The bytes of a chunk (numpy array or torch tensor) that must hold dtype ``code``."""
    if isinstance(chunk, np.ndarray):
        if chunk.dtype != stored_dtype(code):
            raise ValueError(f"chunk of {name} has numpy dtype {chunk.dtype}, planned {code}")
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    if dtype_code(chunk.dtype) != code:
        raise ValueError(f"chunk of {name} has dtype {chunk.dtype}, planned {code}")
    import torch

    return chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` of ``fd`` (a write may write fewer than asked)."""
    data = data.cast("B")
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def copy_ranges_at(ranges: list[tuple[Path, int, int]], fd: int, offset: int) -> None:
    """Copy each ``(path, position, nbytes)`` range, one after the other, to ``offset`` of ``fd``."""
    for path, position, nbytes in ranges:
        copy_range_at(path, position, nbytes, fd, offset)
        offset += nbytes


def copy_range_at(path: Path, position: int, nbytes: int, fd: int, offset: int) -> None:
    """Copy ``nbytes`` at ``position`` of ``path`` to ``offset`` of ``fd``: in the kernel where it can, else read and
    write."""
    source = os.open(path, os.O_RDONLY)
    try:
        left = nbytes
        while left > 0:
            done = _copy_file_range(source, fd, position, offset, min(left, _COPY_BLOCK))
            if done <= 0:
                break  # unsupported here (cross-filesystem, old kernel): plain reads and writes
            position, offset, left = position + done, offset + done, left - done
        while left > 0:
            data = os.pread(source, min(left, _COPY_BLOCK), position)
            if not data:
                raise OSError(f"{path} ended {left} bytes early")
            _pwrite_all(fd, memoryview(data), offset)
            position, offset, left = position + len(data), offset + len(data), left - len(data)
    finally:
        os.close(source)


def _copy_file_range(src: int, dst: int, position: int, offset: int, count: int) -> int:
    if not hasattr(os, "copy_file_range"):
        return 0
    try:
        return os.copy_file_range(src, dst, count, position, offset)  # both positions explicit: no file offset moves
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
            return 0
        raise


def parse_size(text: str) -> int:
    """Parse a size like '2GB', '500MB', '4096' (bytes) into bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    clean = text.strip().upper().replace("IB", "B")
    for unit, factor in units.items():
        if clean.endswith(unit) and clean[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(clean[: -len(unit)]) * factor)
    if clean.isdigit():
        return int(clean)
    raise ValueError(f"not a size: {text!r} (use e.g. 2GB, 500MB)")
