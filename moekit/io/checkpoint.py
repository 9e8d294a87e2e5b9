"""Streaming, validated access to a Hugging Face safetensors checkpoint.

``Checkpoint`` reads config.json and every shard's safetensors header up front (a few KB each),
so shapes, dtypes and names of all tensors are known before any weight is touched; that lets
``mix`` check compatibility and plan its output completely first. Tensors are then read one at a
time with plain positioned reads (not mmap: mapped pages would count towards the process's
resident memory for as long as the shard stays mapped), so memory holds only what the caller keeps.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.errors import CorruptCheckpointError, InputNotFoundError
from moekit.io.floats import STORED, stored_dtype

_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def __getattr__(name: str) -> Any:
    """``SAFETENSORS_DTYPES`` (code -> torch dtype) and ``DTYPE_NAMES`` (torch dtype -> code), built on
    first use: importing this module must not import torch (``mix`` runs without it)."""
    if name in ("SAFETENSORS_DTYPES", "DTYPE_NAMES"):
        import torch

        codes = {code: getattr(torch, torch_name) for code, torch_name in _TORCH_NAMES.items()}
        return codes if name == "SAFETENSORS_DTYPES" else {v: k for k, v in codes.items()}
    raise AttributeError(name)


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a torch dtype, a code, or a name like 'bfloat16'."""
    if isinstance(dtype, str):
        return dtype if dtype in _TORCH_NAMES else {v: k for k, v in _TORCH_NAMES.items()}[dtype.removeprefix("torch.")]
    return {v: k for k, v in _TORCH_NAMES.items()}[str(dtype).removeprefix("torch.")]


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it looks like, read from a safetensors header."""

    shard: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int


# Bytes per element of every safetensors dtype (including ones moekit refuses later, e.g. fp8).
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _check_entries(path: Path, header: dict[str, Any], data_size: int, fix: str) -> None:
    """Every tensor entry must describe exactly its bytes: dtype x shape = span, inside the data, no overlaps.

    A header that disagrees with its data would make a reader take another tensor's bytes.
    """
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (meta.get("shape"), meta.get("data_offsets")) if isinstance(meta, dict) else (None, None)
        valid = (
            isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        )
        if not valid:
            raise CorruptCheckpointError(
                f"{path}: the header entry of tensor {name} is malformed or points outside the file.", fix
            )
        size = _DTYPE_BYTES.get(str(meta.get("dtype")))
        if size is not None and offsets[1] - offsets[0] != math.prod(shape) * size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name} is described as {meta['dtype']} {shape} ({math.prod(shape) * size} bytes) "
                f"but its data span holds {offsets[1] - offsets[0]} bytes.",
                fix,
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptCheckpointError(f"{path}: the data of tensors {first} and {second} overlap.", fix)


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Parse and validate a safetensors header; return (data start offset, header).

    Raises CorruptCheckpointError for a short, truncated or unparsable file, and for a header
    whose entries disagree with the data (see :func:`_check_entries`).
    """
    fix = "Re-download or re-save the model (save_pretrained writes safetensors)."
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise CorruptCheckpointError(f"{path} is too short to be a safetensors file.", fix)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, 100 << 20):
            raise CorruptCheckpointError(f"{path} has an invalid safetensors header length.", fix)
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({exc}).", fix)
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} has a malformed safetensors header.", fix)
    data_end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and _has_offsets(v)), default=0
    )
    if 8 + header_len + data_end > size:
        raise CorruptCheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes but the file has {size}.",
            fix,
        )
    _check_entries(path, header, size - 8 - header_len, fix)
    return 8 + header_len, header


def _has_offsets(meta: Any) -> bool:
    offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
    return isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)


# Exponent masks: a float is NaN or infinite exactly when all its exponent bits are set.
_NONFINITE_MASKS = {
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000),
}
_SCAN_ELEMENTS = 8 << 20


def finite_on_disk(path: Path, info: TensorInfo) -> bool:
    """Whether a stored float tensor holds no NaN or infinity, checked on its bytes in place.

    A memory map read in chunks with an integer mask on the exponent bits: no tensor is built,
    so data that mix copies file to file is checked at memory speed (and integer tensors pass).
    """
    from moekit.io.floats import finite_bits

    if info.dtype not in _NONFINITE_MASKS or info.nbytes == 0:
        return True
    kind, _ = _NONFINITE_MASKS[info.dtype]
    count = info.nbytes // np.dtype(kind).itemsize
    values = np.memmap(path, dtype=np.dtype(kind).newbyteorder("<"), mode="r", offset=info.offset, shape=(count,))
    try:
        return all(
            finite_bits(values[start : start + _SCAN_ELEMENTS], info.dtype) for start in range(0, count, _SCAN_ELEMENTS)
        )
    finally:
        del values


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"Cannot read {what} {path}: {exc}.", "Fix or re-create the file.")


class Checkpoint:
    """A local HF model directory with safetensors weights, read lazily tensor by tensor."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputNotFoundError(
                f"Model directory {self.path} does not exist.",
                "Pass a local Hugging Face model directory (or a hub id where a hub is reachable).",
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise InputNotFoundError(
                f"{self.path} has no config.json, so it is not a Hugging Face model directory.",
                "Point to the directory that save_pretrained wrote.",
            )
        self.config: dict[str, Any] = _load_json(config_path, "config")
        self.model_type: str = str(self.config.get("model_type", ""))
        self.tensors: dict[str, TensorInfo] = self._read_index()
        self.stored: dict[str, TensorInfo] = self.tensors
        self._view_sources: dict[str, tuple[str, int]] = {}
        self._handles: dict[str, Any] = {}

    def apply_views(self, views: dict[str, TensorInfo]) -> None:
        """Expose ``views`` (stored tensors and row slices of them) as this checkpoint's tensors.

        Used for families that store fused projections (e.g. qkv_proj): generic code then sees
        q_proj/k_proj/v_proj, and :meth:`to_stored` reassembles the fused tensors when needed.
        """
        self._view_sources = {}
        for name, info in views.items():
            if name in self.stored:
                continue
            source = next(
                s
                for s, t in self.stored.items()
                if t.shard == info.shard and t.offset <= info.offset < t.offset + t.nbytes
            )
            row_bytes = self.stored[source].nbytes // self.stored[source].shape[0]
            self._view_sources[name] = (source, (info.offset - self.stored[source].offset) // row_bytes)
        self.tensors = views

    def to_stored(self, state: dict[str, Any]) -> dict[str, Any]:
        """Map tensors keyed by view names back to the stored names, concatenating row slices."""
        import torch

        result: dict[str, Any] = {}
        pieces: dict[str, list[tuple[int, Any]]] = {}
        for name, tensor in state.items():
            if name in self._view_sources:
                source, start = self._view_sources[name]
                pieces.setdefault(source, []).append((start, tensor))
            else:
                result[name] = tensor
        for source, parts in pieces.items():
            result[source] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
        return result

    def _shard_files(self) -> list[str]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            index = _load_json(index_path, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{index_path} has no weight_map.", "Re-save the model.")
            return sorted(set(weight_map.values()))
        if (self.path / "model.safetensors").is_file():
            return ["model.safetensors"]
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise InputNotFoundError(
                f"{self.path} has PyTorch pickle weights but no safetensors.",
                "moekit reads safetensors only (pickles can run code). Convert with "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir).",
            )
        raise InputNotFoundError(
            f"{self.path} has no model.safetensors or model.safetensors.index.json.",
            "Point to a directory written by save_pretrained.",
        )

    def _read_index(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for shard in self._shard_files():
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise InputNotFoundError(
                    f"Shard {shard} listed in {self.path}/model.safetensors.index.json is missing.",
                    "Re-download or re-save the model so that every shard is present.",
                )
            data_start, header = read_safetensors_header(shard_path)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta.get("dtype") not in STORED:
                    raise CorruptCheckpointError(
                        f"Tensor {name} in {shard_path} has unsupported dtype {meta.get('dtype')}.",
                        "moekit handles float and integer tensors; dequantise the model first.",
                    )
                start, end = meta["data_offsets"]
                tensors[name] = TensorInfo(shard, meta["dtype"], tuple(meta["shape"]), data_start + start, end - start)
        return tensors

    def get(self, name: str) -> Any:
        """Read one tensor into a new CPU torch tensor."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        return self.get_rows(name, 0, rows)

    def get_rows(self, name: str, start: int, stop: int) -> Any:
        """Read rows ``start:stop`` (along dim 0) of a tensor as a torch tensor; rows are contiguous on disk."""
        return self.read_rows(self.tensors[name], start, stop, name)

    def read_rows(self, info: TensorInfo, start: int, stop: int, label: str = "") -> Any:
        """Read rows ``start:stop`` of the tensor described by ``info`` (a stored tensor or a view of one) as torch."""
        import torch

        array = self.read_array(info, start, stop, label)
        if info.dtype == "BF16":  # numpy holds bf16 as raw uint16 bits
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)

    def array_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a tensor as a numpy array of its stored dtype (BF16 as raw uint16 bits)."""
        return self.read_array(self.tensors[name], start, stop, name)

    def read_array(self, info: TensorInfo, start: int, stop: int, label: str = "") -> np.ndarray:
        """Rows ``start:stop`` of the tensor described by ``info`` as a new numpy array (one positioned read)."""
        dtype = stored_dtype(info.dtype)
        rows = info.shape[0] if info.shape else 1
        row_bytes = info.nbytes // rows if rows else 0
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        out = np.empty(shape, dtype=dtype)
        if out.size == 0:
            return out
        buffer = out.reshape(-1).view(np.uint8)  # read straight into the array's memory
        try:
            if info.shard not in self._handles:
                self._handles[info.shard] = open(self.path / info.shard, "rb")
            handle = self._handles[info.shard]
            handle.seek(info.offset + start * row_bytes)
            if handle.readinto(buffer) != len(buffer):
                raise OSError("short read")
        except OSError as exc:
            raise CorruptCheckpointError(
                f"Cannot read tensor {label or 'data'} from {self.path / info.shard}: {exc}.",
                "The file is damaged; re-download or re-save the model.",
            )
        return out

    def close(self) -> None:
        """Close open shard files."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def weight_files(self) -> list[Path]:
        """Paths of the weight shards and the index (if any)."""
        files = [self.path / s for s in sorted({t.shard for t in self.tensors.values()})]
        index = self.path / "model.safetensors.index.json"
        return files + ([index] if index.is_file() else [])

    def dtype_code(self) -> str:
        """The checkpoint's floating dtype as a safetensors code: that of most of its float values, else config.json's.

        The stored tensors decide, not config.json: configs written by some tools (and by
        save_pretrained after training in fp32) name another dtype than the weights have.
        """
        counts: dict[str, int] = {}
        for info in self.stored.values():
            if info.dtype in ("F64", "F32", "F16", "BF16"):
                counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes // np.dtype(STORED[info.dtype]).itemsize
        if counts:
            return max(counts, key=counts.__getitem__)
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        codes = {v: k for k, v in _TORCH_NAMES.items() if k in ("F64", "F32", "F16", "BF16")}
        return codes.get(str(name).removeprefix("torch."), "F32") if isinstance(name, str) else "F32"

    def dtype(self) -> Any:
        """The checkpoint's floating dtype as a torch dtype (see :meth:`dtype_code`)."""
        import torch

        return getattr(torch, _TORCH_NAMES[self.dtype_code()])
