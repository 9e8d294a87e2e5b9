"""Atomic writes: temporary directories and files renamed into place, free space, a full disk named as such.

Every output is written into a temporary directory (or file) next to its final path (same
parent, so the final ``os.rename`` is atomic on one filesystem) and renamed into place only when
everything succeeded (``moekit.io.outputs.atomic_output_dir``, :func:`write_text_atomic`). A
crash, a Ctrl-C, a SIGTERM or a user error leaves no half-written output. A SIGKILL cannot be
caught, so a temporary directory's name carries the host and process id
(``.NAME.tmp-HOST-PID-XXXX``); the next write of the same output removes those whose process is
gone (never one a live process owns, never one of another host). What an output may replace is
decided by ``moekit.io.outputs``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moekit.errors import (
    DiskFullError,
    InvalidOptionError,
    MoekitError,
)

_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Delete ``parent/.NAME.tmp-*`` and ``.NAME.old-*`` left by dead processes of this host; return them."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _STALE.match(entry.name)
        if match is None or match["name"] != name or match["host"] != _host() or not entry.is_dir():
            continue
        if int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def temporary_dir(parent: Path, name: str, kind: str) -> Path:
    """A new directory ``parent/.NAME.KIND-HOST-PID-XXXX``, readable as the umask allows (mkdtemp makes 0700)."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_host()}-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


_LOW_SPACE_BYTES = 64 << 20  # a write that fails with less than this free is taken to have filled the disk


def _existing_ancestor(path: Path) -> Path:
    ancestor = Path(path).absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def _last_line(exc: BaseException) -> str:
    """The innermost message of an exception (DCP's carries whole remote tracebacks)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a failed write on a (nearly) full disk into a DiskFullError that says so.

    torch and safetensors report a full disk in their own words ("unexpected pos 5248 vs 5140",
    "file write failed", "IoError(StorageFull)"); the free space left on the disk is what tells.
    """
    try:
        yield
    except (MoekitError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # also torch.distributed.checkpoint's CheckpointException, a BaseException
        free = shutil.disk_usage(_existing_ancestor(path)).free
        if free < _LOW_SPACE_BYTES:
            raise DiskFullError(
                f"The disk is full: writing {what} failed ({_last_line(exc)}); the disk holding {path} has "
                f"{free / 1e6:.1f} MB free.",
                "Free space on that disk, or write to another disk. Unfinished outputs were removed; "
                "checkpoints written before are kept for --resume.",
            ) from exc
        raise


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Refuse to start writing ``needed_bytes`` under ``out`` when its file system has less room free."""
    ancestor = _existing_ancestor(out)
    free = shutil.disk_usage(ancestor).free
    if free < needed_bytes + (16 << 20):  # a little room for configs, tokenizer files and metadata
        raise InvalidOptionError(
            f"Not enough disk space for {out}: it needs about {needed_bytes / 1e9:.2f} GB, and {ancestor} has "
            f"{free / 1e9:.2f} GB free.",
            "Free space on that disk, or write the output to another disk.",
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    Replacing (instead of writing in place) also means a hard-linked file is never modified:
    the path gets a new inode and the other links keep the old content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a run's manifest is as readable as its other files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
