"""Slurm through its own commands: ``sbatch``, ``squeue``, ``scancel``, ``sinfo``.

Nothing here knows moekit's stages: it checks that Slurm is there and answers, asks it whether a
request can ever run (``sbatch --test-only``), submits a batch script, reads job states and
cancels jobs. Every call has a time limit, and every failure becomes a :class:`ClusterError` that
says what Slurm said. Slurm forgets a finished job a few minutes after it ends (``MinJobAge``,
300 s by default) unless accounting is set up; callers keep their own record of what a job did.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ClusterError

COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
# States in which a job may still run (squeue's %T); every other state is final.
LIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
    }
)


@dataclass(frozen=True)
class JobState:
    """One job as squeue shows it."""

    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str  # why it is pending (Dependency, Resources, BeginTime, ...) or None
    name: str
    comment: str

    @property
    def live(self) -> bool:
        """Whether the job may still run."""
        return self.state in LIVE_STATES


def timeout_seconds() -> float:
    """How long one Slurm command may take (``MOEKIT_SLURM_TIMEOUT``, default 60 s)."""
    return float(os.environ.get("MOEKIT_SLURM_TIMEOUT", "60"))


def _run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout_seconds())
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"Slurm did not answer `{' '.join(command[:2])} ...` within {timeout_seconds():.0f} s.",
            "Check that slurmctld is up (scontrol ping) and try again; MOEKIT_SLURM_TIMEOUT sets the wait.",
        ) from None
    except OSError as exc:
        raise ClusterError(f"Cannot run {command[0]}: {exc}.", "Check the Slurm installation on this machine.")


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"


def check_available() -> None:
    """Raise ClusterError unless Slurm's commands are on PATH and its controller answers."""
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        raise ClusterError(
            f"The slurm launcher needs Slurm's commands, and {', '.join(missing)} is not on PATH.",
            "Run moekit run on a Slurm login node (or load its module: module load slurm), or use "
            "launcher.kind local or inline.",
        )
    result = _run(["sinfo", "--noheader", "--format=%P"])
    if result.returncode != 0:
        raise ClusterError(
            f"Slurm does not answer: sinfo said: {_said(result)}",
            "Check that slurmctld is up (scontrol ping) and that SLURM_CONF points at its configuration.",
        )


def describe_nodes() -> str:
    """The cluster's nodes in one line each: name, CPUs, memory (MB), GPUs and partitions (for error messages)."""
    result = _run(["sinfo", "--noheader", "--Node", "--format=%N|%c|%m|%G|%P"])
    if result.returncode != 0:
        return ""
    lines = []
    for row in sorted(set(result.stdout.split("\n")) - {""}):
        name, cpus, memory, gres, partition = (row.split("|") + [""] * 5)[:5]
        gpus = gres if gres not in ("(null)", "") else "no GPUs"
        lines.append(f"{name}: {cpus} CPUs, {memory} MB, {gpus} (partition {partition})")
    return "; ".join(lines)


def cannot_run(options: list[str]) -> str | None:
    """What Slurm says against a job with ``options`` (``sbatch --test-only``: nothing is submitted), or None."""
    result = _run(["sbatch", "--test-only", *options], stdin="#!/bin/sh\ntrue\n")
    if result.returncode == 0:
        return None
    return _said(result).replace("sbatch: error: ", "")


def submit(script: Path, options: list[str]) -> str:
    """Submit ``script`` with ``options``; return the job id."""
    result = _run(["sbatch", "--parsable", *options, str(script)])
    if result.returncode != 0:
        raise ClusterError(f"sbatch refused {script}: {_said(result)}", "Fix the launcher.slurm section of the recipe.")
    return result.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """The jobs Slurm still knows among ``job_ids`` (one it has forgotten is absent)."""
    if not job_ids:
        return {}
    command = ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r|%j|%k", f"--jobs={','.join(job_ids)}"]
    result = _run(command)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:  # every one of them forgotten
            return {}
        raise ClusterError(f"squeue failed: {_said(result)}", "Check that slurmctld is up (scontrol ping).")
    return _parse(result.stdout)


def jobs_named(names: list[str]) -> dict[str, JobState]:
    """Live jobs of this user named one of ``names``, by name (those submitted but never recorded)."""
    if not names:
        return {}
    result = _run(["squeue", "--noheader", "--me", "--format=%i|%T|%r|%j|%k", f"--name={','.join(names)}"])
    if result.returncode != 0:
        raise ClusterError(f"squeue failed: {_said(result)}", "Check that slurmctld is up (scontrol ping).")
    return {state.name: state for state in _parse(result.stdout).values() if state.live}


def _parse(text: str) -> dict[str, JobState]:
    states = {}
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            job_id, state, reason, name, comment = parts
            base = job_id.split("_")[0]
            states[base] = JobState(base, state.split()[0], reason, name, comment if comment != "(null)" else "")
    return states


def cancel(job_ids: list[str]) -> None:
    """Cancel ``job_ids`` (those already ended are left as they are)."""
    if job_ids:
        result = _run(["scancel", *job_ids])
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            raise ClusterError(f"scancel failed: {_said(result)}", "Cancel them by hand: scancel JOBID.")
