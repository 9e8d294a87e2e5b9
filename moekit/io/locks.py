"""One writer per output: a lock held for the whole of a ``train`` or ``tune`` job.

The lock is ``fcntl.flock`` on a hidden file beside the output (``RUN_DIR/.train-NAME.lock`` for
a branch, ``.OUT.lock`` next to a tune's output, e.g. ``RUN_DIR/.tuned.lock``). The kernel
releases it when the process ends, however it ends (a crash, SIGKILL, a node that reboots): a
lock left by a dead job is simply free, and the next job takes it. The holder writes its pid, host
and start time into the file, so a refused job can name it; the file is removed when the job ends.

On a shared filesystem: NFS (v4, or v3 with lockd) carries ``flock`` locks between nodes
(Linux emulates them with byte-range locks), and the server frees a crashed node's locks when its
lease ends. Lustre needs the ``flock`` mount option (with ``localflock`` the lock holds only on
one node) and GPFS/BeeGFS need their global locking enabled; where locks are not shared between
nodes, two jobs on two nodes are not stopped: give each branch one job.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from moekit.errors import BusyError


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {info['pid']} on {info['host']}, started {info['started']} ({info.get('what', '')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its lock; BusyError when a live job holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BusyError(
                f"{what} is in use by another job: {_holder(path)}.",
                "Wait for that job to finish, or stop it; two jobs writing one output would corrupt it.",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: try again on the new one
            return fd
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock ``path`` for the block; BusyError naming the holder when another live job holds it.

    The lock file exists only while it is held (it is removed on the way out), so a finished or
    refused job leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what)
    try:
        started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding the lock: a job that opened it meanwhile retries on a new file
        os.close(fd)


@contextlib.contextmanager
def idle_run(run_dir: Path) -> Iterator[None]:
    """Hold every job lock of a run directory (``.train-NAME.lock``, ``.tuned.lock``, ...) for the block: replacing
    or relinking a run's branches while a job writes them would mix two runs; BusyError names the job."""
    with contextlib.ExitStack() as held:
        if Path(run_dir).is_dir():
            for path in sorted(Path(run_dir).glob(".*.lock")):
                if path.name != ".moekit.lock":  # the manifest's own lock, held only for moments
                    held.enter_context(exclusive(path, f"The run {run_dir}"))
        yield


def _wait_for(path: Path) -> int | None:
    """A descriptor of ``path`` holding its lock, after waiting for it; None when the file cannot be made."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed it while we waited: wait on the new file
            return fd
        os.close(fd)


@contextlib.contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold the lock ``path`` for the block, waiting while another process holds it (for short work that two jobs
    may both start, such as preparing one cache entry). The file is removed on the way out, as :func:`exclusive`
    does, so nothing is left behind.

    Where the lock file cannot be made (a read-only cache, which nothing will write either), the block runs
    unlocked.
    """
    fd = _wait_for(Path(path))
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it: a process that opened it meanwhile retries on a new file
            os.close(fd)
