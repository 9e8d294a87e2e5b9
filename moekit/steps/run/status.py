"""``moekit status``: each stage of a recipe run, its job, and how far it got.

A stage's state comes from three places, in this order: the run manifest (a ``run:STAGE`` record
with the stage's current fingerprint: done), the scheduler (Slurm's ``squeue``, or whether a
local job's process still runs), and what the job wrote about itself (``jobs/state/STAGE.json``)
once the scheduler has forgotten it. Step, loss, tokens/s and ETA are read off the last progress
line of the job's log. It reads only: it is correct while jobs run, after ``moekit run`` has
exited, and from another machine that sees the work directory.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from moekit.cluster import processes, slurm
from moekit.errors import ClusterError, MoekitError
from moekit.progress import parse_plain_line
from moekit.recipe import Recipe, load_recipe
from moekit.steps.run.jobs import JobRecord, job_files, load_jobs, log_tail, read_state
from moekit.steps.run.plan import PlannedStage, plan_run

FINAL_STATES = frozenset({"done", "failed", "cancelled", "stopped", "not run"})
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}


@dataclass
class StageStatus:
    """One stage: its state, its job, what it reported last."""

    stage: str
    state: str  # done, running, pending, to run, failed, cancelled, stopped, not run
    job_id: str = ""
    detail: str = ""  # why it is pending, how it failed
    progress: dict[str, str] = field(default_factory=dict)  # done, total, loss, tok/s, ETA (from the log)
    log: Path | None = None


@dataclass
class RunStatus:
    """Every stage of one recipe run."""

    workdir: Path
    recipe: str
    launcher: str
    stages: list[StageStatus]
    scheduler_note: str = ""  # set when the scheduler could not be asked


def find_workdir(path: Path) -> Path:
    """The work directory of ``path``: a recipe file, a recipe's workdir, or the run directory inside one."""
    from moekit.steps.run.runner import RECIPE_AS_RUN

    path = Path(path).absolute()
    if path.is_file():
        return load_recipe(path).workdir
    for candidate in (path, path.parent):
        if (candidate / RECIPE_AS_RUN).is_file():
            return candidate
    raise MoekitError(
        f"{path} is not a recipe run: neither it nor its parent holds the {RECIPE_AS_RUN} that moekit run writes.",
        "Give the recipe file, its workdir, or the run directory inside the workdir (WORKDIR/run).",
    )


def recipe_as_run(workdir: Path) -> Recipe:
    """The recipe as ``moekit run`` last ran it in ``workdir``."""
    from moekit.steps.run.runner import RECIPE_AS_RUN

    return load_recipe(workdir / RECIPE_AS_RUN)


def _slurm_live(job: slurm.JobState) -> tuple[str, str]:
    if job.state in _SLURM_RUNNING:
        return "running", ""
    if job.reason == "Dependency":
        return "pending", "waits for the stages it needs"
    reason = "" if job.reason in ("None", "") else job.reason
    return "pending", f"Slurm: {job.state.lower()}{f', {reason}' if reason else ''}"


def _from_job(said: dict[str, str]) -> tuple[str, str]:
    """The state of a job the scheduler no longer knows, from what the job wrote about itself."""
    state = said.get("state", "")
    if state == "interrupted":
        return "cancelled", "interrupted (SIGTERM or Ctrl-C)"
    if state in ("stopped", "failed"):
        return state, said.get("error", "")
    if state == "done":
        return "done", ""
    return "failed", "the job ended without a word (killed, out of memory, or its node failed): see its log"


def _slurm_final(job: slurm.JobState, said: dict[str, str]) -> tuple[str, str]:
    if job.state == "CANCELLED":
        if "DependencyNeverSatisfied" in job.reason:
            return "cancelled", "a stage it needs failed"
        return "cancelled", "cancelled (scancel)" if said.get("state") != "failed" else said.get("error", "")
    if job.state == "COMPLETED":
        return _from_job(said)
    if job.state == "TIMEOUT":
        return "failed", "reached its time limit (give the stage more time: launcher.slurm...time)"
    error = said.get("error", "")
    return "failed", f"Slurm: {job.state.lower()}" + (f"; {error}" if error else "")


def _job_state(workdir: Path, job: JobRecord, known: dict[str, slurm.JobState] | None) -> tuple[str, str]:
    said = read_state(workdir, job.stage)
    if str(said.get("job_id" if job.launcher == "slurm" else "pid", "")) != job.job_id:
        said = {}  # written by an earlier job of the stage (or none yet)
    if job.launcher == "slurm" and known is None:  # Slurm could not be asked: what the job said, if anything
        return (said.get("state") or "pending"), "as the job last recorded it"
    if job.launcher == "slurm":
        assert known is not None
        state = known.get(job.job_id)
        if state is not None:
            return _slurm_live(state) if state.live else _slurm_final(state, said)
    elif job.host and job.host != socket.gethostname():  # a local job of another machine: what it recorded
        return (said.get("state") or "to run"), f"process {job.job_id} on {job.host}"
    elif processes.alive(int(job.job_id), job.process_start):
        return "running", ""
    return _from_job(said)  # ended, and forgotten by Slurm (MinJobAge)


def _progress(log: Path) -> dict[str, str]:
    for line in reversed(log_tail(log, 40).splitlines()):
        fields = parse_plain_line(line)
        if fields is not None:
            return fields
    return {}


def stage_statuses(
    workdir: Path, plan: list[PlannedStage], jobs: dict[str, JobRecord]
) -> tuple[list[StageStatus], str]:
    """Each planned stage's status (and a note when Slurm could not be asked)."""
    note: str = ""
    known: dict[str, slurm.JobState] | None = {}
    asked = [j.job_id for j in jobs.values() if j.launcher == "slurm"]
    if asked:
        try:
            known = slurm.job_states(asked)
        except ClusterError as exc:
            note, known = f"Slurm could not be asked ({exc.message}); the states are what the jobs recorded.", None
    statuses = []
    for stage in plan:
        log = job_files(workdir, stage.name).log
        job = jobs.get(stage.name)
        current = job is not None and job.fingerprint == stage.fingerprint
        if stage.done:
            state, detail = "done", ""
        elif current:
            state, detail = _job_state(workdir, job, known)  # type: ignore[arg-type]
        else:
            state, detail = "to run", ""
        statuses.append(
            StageStatus(
                stage.name,
                state,
                job.job_id if current else "",  # type: ignore[union-attr]
                detail,
                _progress(log) if current and state != "done" else {},
                log if log.is_file() else None,
            )
        )
    return statuses, note


def run_status(path: Path) -> RunStatus:
    """The status of the recipe run at ``path`` (a recipe, its workdir, or its run directory)."""
    workdir = find_workdir(path)
    recipe = recipe_as_run(workdir)
    statuses, note = stage_statuses(workdir, plan_run(recipe), load_jobs(workdir))
    return RunStatus(workdir, recipe.name, recipe.launcher.kind, statuses, note)


def cancel_run(path: Path) -> list[str]:
    """Cancel the run's jobs that may still run; return the stages cancelled."""
    status = run_status(path)
    jobs = load_jobs(status.workdir)
    live = [s for s in status.stages if s.state in ("running", "pending") and s.stage in jobs]
    slurm_ids = [jobs[s.stage].job_id for s in live if jobs[s.stage].launcher == "slurm"]
    if slurm_ids:
        slurm.cancel(slurm_ids)
    for s in live:
        job = jobs[s.stage]
        if job.launcher == "local" and job.host == socket.gethostname():
            processes.terminate(int(job.job_id), job.process_start)
    return [s.stage for s in live]
