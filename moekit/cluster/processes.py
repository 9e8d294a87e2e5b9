"""Jobs as processes on this machine: started in a session of their own, found again by pid, stopped as a group.

A job started here outlives the command that started it (its own session: a Ctrl-C at the
terminal reaches the launcher only, which decides what to stop). A later command finds it again
by pid; the process's start time, recorded at launch, tells it from a new process that reuses the
pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; fields 1-2 (pid, name) end at the last ')'


def spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip


def alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` still runs and is the one that started at ``started`` (without /proc, as on macOS:
    whether a process ``pid`` exists)."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = start_time(pid)
    if now is None:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie: it has ended, its parent has not reaped it yet
    return started is None or now == started


def terminate(pid: int, started: str | None) -> bool:
    """Send SIGTERM to the process group of job ``pid`` (if it still runs); return whether it did."""
    if not alive(pid, started):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)  # the job leads its own session and group: torchrun's workers too
        return True
    return False
