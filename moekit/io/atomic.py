"""Atomic output directories.

Every step writes its output into a temporary directory next to the final path (same parent,
so the final ``os.rename`` is atomic on one filesystem) and renames it into place only when
everything succeeded. A crash, a Ctrl-C or a user error leaves no half-written output: the
temporary directory is removed on any exception.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moekit.errors import OutputExistsError


def check_output_dir(out: Path, force: bool) -> None:
    """Raise :class:`OutputExistsError` if ``out`` exists, is not empty and ``force`` is off."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"The output path {out} exists and is a file, not a directory.",
            "Choose another --out path or remove the file.",
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(
            f"The output directory {out} already exists and is not empty.",
            "Choose another --out path, or pass --force to replace it.",
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block exits without error.

    An existing ``out`` is replaced only if it is empty or ``force`` is true; the old
    directory is moved aside first and deleted only after the new one is in place.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
