"""Reading DCP checkpoints without running code from them, and checking them before they are loaded.

``torch.distributed.checkpoint`` reads a checkpoint's ``.metadata`` with a plain ``pickle.load``
and its non-tensor values (optimiser hyperparameters, step counters) with
``torch.load(weights_only=False)``: a crafted file in a run directory (a shared cluster
filesystem, a copied run) would run code on ``--resume``. moekit reads both itself:

- the metadata with an unpickler that admits only the classes DCP's metadata is made of (its
  metadata dataclasses, torch sizes, dtypes and layouts, paths); anything else is refused;
- non-tensor values with ``torch.load(weights_only=True)`` (plain numbers, strings, tuples, lists,
  dicts and tensors), as DCP already does for tensors.

:func:`check_checkpoint` also checks that every file the metadata names is there and long
enough, so a truncated or missing shard is found before any weight is overwritten.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from moekit.errors import CorruptCheckpointError

_METADATA_FILE = ".metadata"
_METADATA_CLASSES = {  # what DCP's metadata is made of (torch 2.4 to 2.14)
    "Metadata",
    "StorageMeta",
    "MetadataIndex",
    "TensorProperties",
    "ChunkStorageMetadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "_MEM_FORMAT_ENCODING",
}
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes, torch sizes, dtypes and layouts, and paths; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        # exact names only: a dotted name ("os.system") would reach through a module's own imports
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(directory: Path) -> Any:
    """The DCP metadata of ``directory``, read without running code; CorruptCheckpointError when it cannot be."""
    path = Path(directory) / _METADATA_FILE
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise CorruptCheckpointError(
            f"Checkpoint {directory} was refused: its {_METADATA_FILE} holds {exc} (a file that could run code "
            "when loaded, or a damaged one).",
            f"Do not resume from checkpoints you did not write; delete {directory}.",
        )
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise CorruptCheckpointError(
            f"Checkpoint {directory} is damaged: its {_METADATA_FILE} cannot be read ({exc or type(exc).__name__}).",
            f"Delete {directory}.",
        )
    if not hasattr(metadata, "state_dict_metadata") or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CorruptCheckpointError(
            f"Checkpoint {directory} is damaged: its {_METADATA_FILE} is not DCP metadata.", f"Delete {directory}."
        )
    return metadata


def check_checkpoint(directory: Path) -> None:
    """Refuse a checkpoint whose metadata cannot be read safely or whose shard files are missing or short."""
    metadata = read_metadata(directory)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CorruptCheckpointError(
                f"Checkpoint {directory} is damaged: its metadata names a shard outside it ({name!r}).",
                f"Delete {directory}.",
            )
        needed[name] = max(needed.get(name, 0), int(info.offset) + int(info.length))
    for name, size in needed.items():
        path = Path(directory) / name
        actual = path.stat().st_size if path.is_file() else None
        if actual is None or actual < size:
            what = "is missing" if actual is None else f"has {actual:,} bytes of the {size:,} its metadata names"
            raise CorruptCheckpointError(
                f"Checkpoint {directory} is damaged: shard {name} {what}.", f"Delete {directory}."
            )


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the metadata read by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by moekit
            raise CorruptCheckpointError(
                f"Checkpoint {self.path} has per-rank metadata, which moekit does not write.", f"Delete {self.path}."
            )
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpointError(
                f"A checkpoint value ({read_item.dest_index.fqn}) was refused: {str(exc).splitlines()[0]}",
                "Do not resume from checkpoints you did not write; delete that checkpoint.",
            )
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes does
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
