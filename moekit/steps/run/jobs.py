"""What a launcher records of its jobs, under ``WORKDIR/jobs/``.

- ``jobs.json``: one record per stage that was submitted: launcher, job id (Slurm's, or the pid
  for ``local``), the stage's fingerprint, when it was submitted. Written by the launcher, under a
  lock, right after each submission, so a launcher killed at any moment leaves a true record.
- ``logs/STAGE.log``: the job's output (appended to by a requeued job), progress lines included.
- ``state/STAGE.json``: what the job itself says: running, done, failed (with the error), interrupted
  or stopped (to be requeued), with its host, pid and times. It covers what the scheduler forgets:
  Slurm drops a finished job from ``squeue`` minutes after it ends.

Whether a stage is *done* is never read from here: the run manifest's ``run:STAGE`` record (with
the stage's fingerprint) stays the one record of finished work.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError, StoppedToRequeue
from moekit.io.atomic import write_text_atomic
from moekit.steps.run.base import main_process

JOBS_DIR = "jobs"


def file_stem(stage: str) -> str:
    """A stage's name in file names (``train:code`` -> ``train-code``)."""
    return stage.replace(":", "-")


@dataclass(frozen=True)
class JobFiles:
    """The files of one stage's job."""

    log: Path
    state: Path
    stop: Path  # created to ask the job to checkpoint and stop (moekit.train.preempt)
    requeue: Path  # created by a job that stopped to be requeued; its batch script requeues it


def job_files(workdir: Path, stage: str) -> JobFiles:
    """Where the job of ``stage`` logs and records itself."""
    root, stem = Path(workdir) / JOBS_DIR, file_stem(stage)
    return JobFiles(
        root / "logs" / f"{stem}.log",
        root / "state" / f"{stem}.json",
        root / "state" / f"{stem}.stop",
        root / "state" / f"{stem}.requeue",
    )


@dataclass
class JobRecord:
    """One submitted job (``jobs.json``)."""

    stage: str
    launcher: str  # local | slurm
    job_id: str  # Slurm's job id, or the pid of a local job
    fingerprint: str
    submitted: float  # seconds since the epoch
    host: str = ""
    process_start: str | None = None  # local: the process's start time, to tell it from a reused pid


@contextlib.contextmanager
def _jobs_lock(workdir: Path) -> Iterator[Path]:
    path = Path(workdir) / JOBS_DIR / "jobs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".jobs.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_jobs(workdir: Path) -> dict[str, JobRecord]:
    """The recorded jobs by stage (none when nothing was submitted)."""
    path = Path(workdir) / JOBS_DIR / "jobs.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {stage: JobRecord(**fields) for stage, fields in raw["jobs"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MoekitError(
            f"{path} cannot be read ({exc}).", "Delete it: the next moekit run resubmits what is not done."
        )


def record_job(workdir: Path, record: JobRecord) -> None:
    """Add (or replace) the job of ``record.stage`` in ``jobs.json``."""
    with _jobs_lock(workdir) as path:
        jobs = load_jobs(workdir)
        jobs[record.stage] = record
        body = {"jobs": {stage: asdict(job) for stage, job in jobs.items()}}
        write_text_atomic(path, json.dumps(body, indent=1) + "\n")


def read_state(workdir: Path, stage: str) -> dict[str, Any]:
    """What the job of ``stage`` last said about itself ({} if nothing)."""
    try:
        return json.loads(job_files(workdir, stage).state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, **fields: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(fields, indent=1) + "\n")


@contextlib.contextmanager
def job_state(workdir: Path, stage: str) -> Iterator[None]:
    """Record in ``state/STAGE.json`` that this job runs ``stage``, then how it ended (main process only)."""
    if not main_process():
        yield
        return
    files = job_files(workdir, stage)
    files.requeue.unlink(missing_ok=True)
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
        "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1,
        "started": time.time(),
        "scheduled": float(os.environ.get("MOEKIT_JOB_STARTED", "0") or 0),  # when its batch script began (Slurm)
    }
    _write_state(files.state, state="running", **me)
    try:
        yield
    except StoppedToRequeue as exc:
        files.requeue.touch()
        _write_state(files.state, state="stopped", error=exc.message, ended=time.time(), **me)
        raise
    except MoekitError as exc:
        _write_state(files.state, state="failed", error=f"{exc.message} {exc.hint}".strip(), ended=time.time(), **me)
        raise
    except KeyboardInterrupt:
        _write_state(files.state, state="interrupted", ended=time.time(), **me)
        raise
    except BaseException as exc:
        _write_state(files.state, state="failed", error=f"{type(exc).__name__}: {exc}", ended=time.time(), **me)
        raise
    _write_state(files.state, state="done", ended=time.time(), **me)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a job's log ('' if there is none)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
