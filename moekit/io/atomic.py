"""Atomic output directories, and the guards that keep ``--force`` from deleting what it must not.

Every step writes its output into a temporary directory next to the final path (same parent,
so the final ``os.rename`` is atomic on one filesystem) and renames it into place only when
everything succeeded. A crash, a Ctrl-C, a SIGTERM or a user error leaves no half-written
output: the temporary directory is removed on any exception. A SIGKILL cannot be caught, so the
temporary directory's name carries the host and process id (``.NAME.tmp-HOST-PID-XXXX``); the
next write of the same output removes those whose process is gone (never one a live process
owns, never one of another host).

``--force`` replaces an output directory. It never replaces (or takes with it) an input, a run
directory it reads, or a directory moekit did not write: :func:`check_output_apart` and
:func:`check_output_dir` refuse those before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from moekit.errors import (
    DiskFullError,
    InvalidOptionError,
    MoekitError,
    OutputExistsError,
)

# Files that mark a directory as something moekit (or save_pretrained) wrote: a model or a run.
_OUTPUT_MARKERS = ("config.json", "moekit.yaml", "moekit-store.json")
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


def _temporary_dir(parent: Path, name: str, kind: str) -> Path:
    """A new directory ``parent/.NAME.KIND-HOST-PID-XXXX``, readable as the umask allows (mkdtemp makes 0700)."""
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{_host()}-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output that is a file, a non-empty directory without ``force``, or one moekit did not write.

    With ``force``, a non-empty directory is replaced only if it holds a model or a run
    (config.json or moekit.yaml): ``--force`` on a home directory or a data directory by mistake
    must not delete it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"The output path {out} exists and is a file, not a directory.",
            "Choose another --out path or remove the file.",
        )
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise OutputExistsError(
                f"The output directory {out} already exists and is not empty.",
                "Choose another --out path, or pass --force to replace it.",
            )
        if not any((out / marker).is_file() for marker in _OUTPUT_MARKERS):
            raise OutputExistsError(
                f"The output directory {out} is not a model or run directory (no config.json or moekit.yaml); "
                "--force replaces only what moekit writes, and would delete everything in it.",
                "Choose an --out path that is new, empty, or an earlier moekit output.",
            )
    check_writable_parent(out)


def check_writable_parent(out: Path) -> None:
    """Refuse an output whose nearest existing ancestor cannot be written (read-only disk, permissions)."""
    ancestor = Path(out).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidOptionError(
            f"Cannot create {out}: {ancestor} is not a directory.", "Choose an output path under a directory."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidOptionError(
            f"Cannot write {out}: {ancestor} is not writable (read-only file system or no permission).",
            "Choose an output location you can write to.",
        )


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
                "Free space on that disk, or write elsewhere (--out). Unfinished outputs were removed; "
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
            "Free space on that disk, or write the output elsewhere (--out).",
        )


def check_output_apart(out: Path, inputs: Iterable[Path], run_dir: Path | None = None) -> None:
    """Refuse an output that is, contains or lies inside an input, or is or contains the run directory.

    (``--force`` replaces the output directory: it must never take inputs with it.)
    """
    target = Path(out).resolve()
    run = Path(run_dir).resolve() if run_dir is not None else None
    if run is not None and run.is_relative_to(target):
        raise InvalidOptionError(
            f"The output {out} is or contains the run directory {run_dir}; writing it would destroy the run.",
            "Use the default output inside the run directory, or another directory.",
        )
    for path in inputs:
        source = Path(path).resolve()
        if source.is_relative_to(target) or target.is_relative_to(source):
            raise InvalidOptionError(
                f"The output {out} overlaps the input {path}; writing it would destroy inputs.",
                "Choose an output directory outside the seed, the branches and the other inputs.",
            )


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block exits without error.

    An existing ``out`` is replaced only as :func:`check_output_dir` allows; the old directory
    is moved aside first and deleted only after the new one is in place.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    tmp = _temporary_dir(out.parent, out.name, "tmp")
    try:
        with writing(out, str(out)):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = _temporary_dir(out.parent, out.name, "old")
        os.rename(out, old / "replaced")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
