"""The ``local`` launcher: the run's stages as concurrent processes on this machine.

A stage starts as soon as the stages it needs are done and a slot is free (``max_parallel``); it
gets its GPUs (``CUDA_VISIBLE_DEVICES``) or its share of the CPU threads (``OMP_NUM_THREADS``),
and a training stage with several processes runs under ``torchrun --standalone``. A failed stage
stops only the stages that need it. Jobs run in sessions of their own: a launcher killed outright
leaves them running, and the next ``moekit run`` or ``moekit status`` finds them by pid; Ctrl-C
(or SIGTERM) on the launcher stops them, and their trainings resume from their checkpoints.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from subprocess import Popen

from moekit.cluster import processes
from moekit.errors import InvalidOptionError
from moekit.launch_spec import DISTRIBUTED_KINDS
from moekit.recipe import Recipe
from moekit.steps.run.jobs import JobRecord, job_files, load_jobs, read_state, record_job
from moekit.steps.run.plan import PlannedStage


@dataclass
class Slots:
    """This machine's share-out: jobs at a time, GPUs, threads and processes per job."""

    max_parallel: int
    gpus: list[str]  # the visible GPUs' ids
    gpus_per_job: int
    processes_per_job: int
    threads_per_job: int
    free: list[str] = field(default_factory=list)


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def local_slots(recipe: Recipe) -> Slots:
    """The share-out the recipe asks for on this machine; InvalidOptionError if the machine cannot give it."""
    spec, gpus = recipe.launcher.local, _visible_gpus()
    per_job = spec.gpus_per_job if spec.gpus_per_job is not None else (1 if gpus else 0)
    if per_job > len(gpus):
        raise InvalidOptionError(
            f"launcher.local.gpus_per_job is {per_job}, but this machine shows {len(gpus)} GPU(s).",
            "Lower gpus_per_job (0 runs on the CPU), or run where there are more GPUs.",
        )
    cores = os.cpu_count() or 1
    parallel = spec.max_parallel or (max(1, len(gpus) // per_job) if per_job else min(4, cores))
    if per_job and parallel * per_job > len(gpus):
        parallel = len(gpus) // per_job  # GPUs are not shared between jobs
    threads = spec.threads_per_job or max(1, cores // parallel)
    return Slots(parallel, gpus, per_job, spec.processes_per_job or per_job or 1, threads, list(gpus))


def _command(recipe: Recipe, stage: str, slots: Slots) -> list[str]:
    moekit = ["-m", "moekit", "run", str(recipe.workdir / "recipe.yaml"), "--only", stage]
    if stage.split(":")[0] in DISTRIBUTED_KINDS and slots.processes_per_job > 1:
        per_job = ["--standalone", "--nproc-per-node", str(slots.processes_per_job)]
        return [sys.executable, "-m", "torch.distributed.run", *per_job, *moekit]
    return [sys.executable, *moekit]


@dataclass
class _Running:
    stage: PlannedStage
    record: JobRecord
    process: Popen[bytes] | None  # None: started by an earlier launcher, followed by pid
    gpus: list[str]


class LocalRun:
    """Starts and follows the stages of one run (see the module docstring)."""

    def __init__(self, recipe: Recipe, plan: list[PlannedStage], log: Callable[[str], None]) -> None:
        self.recipe, self.log = recipe, log
        self.slots = local_slots(recipe)
        self.plan = {p.name: p for p in plan}
        self.finished = {p.name for p in plan if p.done}
        self.failed: dict[str, str] = {}  # stage -> what happened
        self.waiting = [p for p in plan if not p.done]
        self.running: dict[str, _Running] = {}

    def run(self, poll: float = 0.5) -> None:
        """Run every stage that is not done; return when none is left to start or running."""
        self._adopt()
        try:
            while self.waiting or self.running:
                self._reap()
                self._give_up_blocked()
                self._start_ready()
                if self.running:
                    time.sleep(poll)
        except KeyboardInterrupt:
            self._stop_all()
            raise

    def _adopt(self) -> None:
        recorded = load_jobs(self.recipe.workdir)
        for stage in list(self.waiting):
            job = recorded.get(stage.name)
            if job is None or job.launcher != "local" or job.fingerprint != stage.fingerprint:
                continue
            if job.host == socket.gethostname() and processes.alive(int(job.job_id), job.process_start):
                self.log(f"{stage.name}: process {job.job_id} of an earlier moekit run still runs; following it")
                self.waiting.remove(stage)
                self.running[stage.name] = _Running(stage, job, None, [])

    def _environment(self, gpus: list[str], processes: int) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MOEKIT_JOB_STARTED", None)  # a Slurm job's own mark, not this job's
        env.update(MOEKIT_PROGRESS_EVERY=f"{self.recipe.launcher.progress_every:g}", PYTHONUNBUFFERED="1")
        threads = str(max(1, self.slots.threads_per_job // processes))  # the job's threads, shared by its processes
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if self.slots.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        return env

    def _start_ready(self) -> None:
        for stage in list(self.waiting):
            if len(self.running) >= self.slots.max_parallel:
                return
            if not all(need in self.finished for need in stage.needs):
                continue
            wanted = self.slots.gpus_per_job if stage.kind in DISTRIBUTED_KINDS else min(1, self.slots.gpus_per_job)
            if len(self.slots.free) < wanted:
                continue
            gpus, self.slots.free = self.slots.free[:wanted], self.slots.free[wanted:]
            self.waiting.remove(stage)
            self._start(stage, gpus)

    def _start(self, stage: PlannedStage, gpus: list[str]) -> None:
        files = job_files(self.recipe.workdir, stage.name)
        files.log.parent.mkdir(parents=True, exist_ok=True)
        with open(files.log, "a", encoding="utf-8") as handle:
            handle.write(f"[moekit] {time.strftime('%H:%M:%S')} stage {stage.name} on {socket.gethostname()}\n")
        submitted = time.time()
        command = _command(self.recipe, stage.name, self.slots)
        workers = self.slots.processes_per_job if "torch.distributed.run" in command else 1
        process = processes.spawn(command, files.log, self._environment(gpus, workers))
        record = JobRecord(
            stage.name, "local", str(process.pid), stage.fingerprint, submitted, socket.gethostname(),
            processes.start_time(process.pid),
        )  # fmt: skip
        record_job(self.recipe.workdir, record)
        self.running[stage.name] = _Running(stage, record, process, gpus)
        where = f" on GPU {','.join(gpus)}" if gpus else ""
        self.log(f"{stage.name}: started (process {process.pid}{where}); log {files.log}")

    def _reap(self) -> None:
        for name, job in list(self.running.items()):
            if job.process is not None:
                code = job.process.poll()
                if code is None:
                    continue
            elif processes.alive(int(job.record.job_id), job.record.process_start):
                continue
            else:
                code = 0 if read_state(self.recipe.workdir, name).get("state") == "done" else 1
            del self.running[name]
            self.slots.free += job.gpus
            took = time.time() - job.record.submitted
            if code == 0:
                self.finished.add(name)
                self.log(f"{name}: done in {took:.0f} s")
            else:
                self.failed[name] = f"exit status {code}"
                self.log(f"[red]{name}: failed[/] (exit status {code}, after {took:.0f} s)")

    def _give_up_blocked(self) -> None:
        """Stages that need a failed stage will not run."""
        changed = True
        while changed:
            changed = False
            for stage in list(self.waiting):
                blocker = next((n for n in stage.needs if n in self.failed), None)
                if blocker is not None:
                    self.waiting.remove(stage)
                    self.failed[stage.name] = f"not run: it needs {blocker}"
                    changed = True

    def _stop_all(self) -> None:
        """Ctrl-C: SIGTERM to every job this launcher follows, then wait for them (they clean up and exit)."""
        for job in self.running.values():
            processes.terminate(int(job.record.job_id), job.record.process_start)
        deadline = time.time() + 60
        while time.time() < deadline and any(
            processes.alive(int(j.record.job_id), j.record.process_start) for j in self.running.values()
        ):
            for job in self.running.values():
                if job.process is not None:
                    job.process.poll()  # reap, so that a finished job is not seen as a zombie that runs
            time.sleep(0.2)
