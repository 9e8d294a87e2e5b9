"""The ``slurm`` launcher: one batch job per stage, chained with ``afterok`` dependencies.

Every job runs ``moekit run WORKDIR/recipe.yaml --only STAGE``; a stage that trains on several
processes or nodes runs it under ``srun`` + ``torchrun`` (c10d rendezvous on the job's first node).
Each job's script is kept in ``WORKDIR/jobs/scripts/`` (it can be submitted again by hand) and
its output appended to ``WORKDIR/jobs/logs/STAGE.log``.

Before anything is submitted (or written), Slurm is asked whether it answers and whether each
stage's resources can ever be granted (``sbatch --test-only``). A job whose dependency fails is
cancelled by Slurm (``--kill-on-invalid-dep``), so nothing waits forever. With ``requeue`` (the
default), a training job receives ``SIGUSR1`` ``signal_seconds`` before its time limit; its script
asks moekit to save a checkpoint and stop (``moekit.train.preempt``), then requeues itself, and
the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moekit.cluster import slurm
from moekit.errors import ClusterError
from moekit.launch_spec import DISTRIBUTED_KINDS
from moekit.recipe import Recipe
from moekit.steps.run.jobs import JOBS_DIR, JobRecord, file_stem, job_files, load_jobs, record_job
from moekit.steps.run.plan import PlannedStage


def run_id(workdir: Path) -> str:
    """A short id of the work directory, in the jobs' names."""
    return hashlib.sha256(str(Path(workdir).absolute()).encode()).hexdigest()[:8]


def job_name(workdir: Path, stage: str) -> str:
    """The Slurm job name of ``stage`` (``moekit.RUNID.STAGE``)."""
    return f"moekit.{run_id(workdir)}.{stage}"


def _processes(recipe: Recipe, stage: str) -> tuple[int, int]:
    """(nodes, processes per node) of ``stage``'s job: stages that do not train run as one process."""
    resources = recipe.launcher.slurm.for_stage(stage)
    if stage.split(":")[0] not in DISTRIBUTED_KINDS:
        return 1, 1
    return resources.nodes or 1, resources.processes_per_node or resources.gpus_per_node or 1


def resource_options(recipe: Recipe, stage: str) -> list[str]:
    """The sbatch options of ``stage``'s resources."""
    resources = recipe.launcher.slurm.for_stage(stage)
    nodes, _ = _processes(recipe, stage)
    options = [f"--nodes={nodes}", "--ntasks-per-node=1"]
    for key, flag in (
        ("gpus_per_node", "--gpus-per-node"),
        ("cpus_per_task", "--cpus-per-task"),
        ("mem", "--mem"),
        ("time", "--time"),
        ("partition", "--partition"),
        ("account", "--account"),
        ("qos", "--qos"),
    ):
        value = getattr(resources, key)
        if value is not None and not (key == "gpus_per_node" and value == 0):
            options.append(f"{flag}={value}")
    return options + list(resources.extra or [])


def _stages_to_check(recipe: Recipe) -> list[str]:
    names = []
    for kind in recipe.stages:
        names += [f"train:{d}" for d in recipe.domains] if kind == "train" else [kind]
    return names


def slurm_preflight(recipe: Recipe) -> None:
    """Slurm is on PATH and answers, and every stage's resources can be granted; ClusterError otherwise."""
    slurm.check_available()
    checked: set[tuple[str, ...]] = set()
    for stage in _stages_to_check(recipe):
        options = resource_options(recipe, stage)
        if tuple(options) in checked:
            continue
        checked.add(tuple(options))
        problem = slurm.cannot_run(options)
        if problem is not None:
            nodes = slurm.describe_nodes()
            raise ClusterError(
                f"Slurm cannot run stage {stage} with the resources the recipe asks for ({' '.join(options)}): "
                f"{problem}.",
                "Ask for what the cluster has in the recipe's launcher.slurm section (or its stages."
                f"{stage.split(':')[0]} entry)" + (f"; its nodes: {nodes}." if nodes else "."),
            )


def _command(recipe: Recipe, stage: str, python: str) -> str:
    moekit = f"-m moekit run {shlex.quote(str(recipe.workdir / 'recipe.yaml'))} --only {shlex.quote(stage)}"
    nodes, per_node = _processes(recipe, stage)
    if nodes == 1 and per_node == 1:
        return f"{python} {moekit}"
    return (
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        # srun does not inherit the job's --cpus-per-task (Slurm >= 22.05): give it on, or each task gets one CPU
        "srun --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} --kill-on-bad-exit=1 "
        f"{python} -m torch.distributed.run "
        f'--nnodes="$SLURM_NNODES" --nproc-per-node={per_node} --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d '
        f'--rdzv-endpoint="$HEAD:$((29500 + SLURM_JOB_ID % 20000))" {moekit}'
    )


def job_script(recipe: Recipe, stage: str, fingerprint: str) -> str:
    """The batch script of ``stage``: its resources, the environment, the command, and the requeue on a stop."""
    spec, files = recipe.launcher.slurm, job_files(recipe.workdir, stage)
    python = shlex.quote(spec.python or sys.executable)
    trains = stage.split(":")[0] in DISTRIBUTED_KINDS
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name(recipe.workdir, stage)}"]
    lines += [f"#SBATCH {option}" for option in resource_options(recipe, stage)]
    lines += [
        f"#SBATCH --output={files.log}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={recipe.workdir}",
        "#SBATCH --kill-on-invalid-dep=yes",
        f"#SBATCH --comment=moekit:{fingerprint}",
        "#SBATCH --requeue" if spec.requeue else "#SBATCH --no-requeue",
    ]
    if spec.requeue and trains and spec.signal_seconds:
        lines.append(f"#SBATCH --signal=B:USR1@{spec.signal_seconds}")
    lines.append(f"# moekit run: stage {stage} of {recipe.workdir} (run again from the top on a requeue)")
    for line in spec.setup:  # a failed setup line fails the job, with the line in its log
        lines.append(f"{line} || {{ echo {shlex.quote(f'[moekit] setup line failed: {line}')}; exit 1; }}")
    lines.append("MOEKIT_JOB_STARTED=$(date +%s.%N); export MOEKIT_JOB_STARTED  # when Slurm started the job")
    env = {
        "MOEKIT_PROGRESS_EVERY": f"{recipe.launcher.progress_every:g}",
        "MOEKIT_STOP_FILE": str(files.stop),
        "PYTHONUNBUFFERED": "1",
    }
    lines.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    per_node = _processes(recipe, stage)[1]  # each process's share of the task's CPUs (Slurm may not pin them)
    lines.append(
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${OMP_NUM_THREADS:-}" ]; then '
        f"export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / {per_node} > 0 ? SLURM_CPUS_PER_TASK / {per_node} : 1 )); fi"
    )
    lines += [
        f"rm -f {shlex.quote(str(files.stop))} {shlex.quote(str(files.requeue))}",
        f'echo "[moekit] $(date +%T) job $SLURM_JOB_ID: stage {stage} on $(hostname), '
        'attempt $((${SLURM_RESTART_COUNT:-0} + 1))"',
        'trap \'echo "[moekit] $(date +%T) asked to stop: checkpointing to requeue"; touch "$MOEKIT_STOP_FILE"\' USR1',
        "(",
        _command(recipe, stage, python),
        ") &",
        "child=$!",
        'while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done  # a trapped signal ends wait',
        f"if [ -e {shlex.quote(str(files.requeue))} ]; then",
        '  echo "[moekit] $(date +%T) stopped at a checkpoint: requeueing"; scontrol requeue "$SLURM_JOB_ID"; sleep 60',
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def submit_stages(recipe: Recipe, plan: list[PlannedStage], log: Callable[[str], None]) -> dict[str, str]:
    """Submit every stage that is not done and has no live job (adopting those that have one); return the job
    ids of the stages left to finish."""
    workdir = recipe.workdir
    recorded = load_jobs(workdir)
    pending = [p for p in plan if not p.done]
    live = slurm.job_states([recorded[p.name].job_id for p in pending if p.name in recorded])
    named = slurm.jobs_named([job_name(workdir, p.name) for p in pending])
    jobs: dict[str, str] = {}
    for stage in pending:
        adopted = _adopt(workdir, stage, recorded.get(stage.name), live, named.get(job_name(workdir, stage.name)))
        if adopted is not None:
            jobs[stage.name] = adopted
            log(f"{stage.name}: job {adopted} is already submitted; following it")
            continue
        after = _direct_needs(stage, plan, jobs)
        jobs[stage.name] = _submit(recipe, stage, [jobs[n] for n in after])
        log(f"{stage.name}: submitted job {jobs[stage.name]}" + (f" (after {', '.join(after)})" if after else ""))
    return jobs


def _direct_needs(stage: PlannedStage, plan: list[PlannedStage], jobs: dict[str, str]) -> list[str]:
    """The unfinished stages ``stage`` waits for, less those that another of them already waits for."""
    needs = {p.name: p.needs for p in plan}
    waits = [n for n in stage.needs if n in jobs]
    return [n for n in waits if not any(n in needs[other] for other in waits)]


def _adopt(
    workdir: Path,
    stage: PlannedStage,
    record: JobRecord | None,
    live: dict[str, slurm.JobState],
    named: slurm.JobState | None,
) -> str | None:
    """The id of a live job already running ``stage`` with its current fingerprint; stale live jobs are cancelled."""
    candidates = []
    if record is not None and record.launcher == "slurm" and record.job_id in live and live[record.job_id].live:
        candidates.append((record.job_id, record.fingerprint))
    if named is not None and named.job_id not in [c[0] for c in candidates]:
        candidates.append((named.job_id, named.comment.removeprefix("moekit:")))
    keep = next((job for job, fingerprint in candidates if fingerprint == stage.fingerprint), None)
    stale = [job for job, _ in candidates if job != keep]
    if stale:  # submitted for other inputs or options: its result would not count
        slurm.cancel(stale)
    if keep is not None and (record is None or record.job_id != keep):
        record_job(workdir, JobRecord(stage.name, "slurm", keep, stage.fingerprint, time.time()))
    return keep


def _submit(recipe: Recipe, stage: PlannedStage, needs: list[str]) -> str:
    scripts = recipe.workdir / JOBS_DIR / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    job_files(recipe.workdir, stage.name).log.parent.mkdir(parents=True, exist_ok=True)
    script = scripts / f"{file_stem(stage.name)}.sbatch"
    script.write_text(job_script(recipe, stage.name, stage.fingerprint), encoding="utf-8")
    options = [f"--dependency=afterok:{':'.join(needs)}"] if needs else []
    submitted = time.time()
    try:
        job_id = slurm.submit(script, options)
    except ClusterError as exc:
        raise ClusterError(f"Submitting stage {stage.name} failed: {exc.message}", exc.hint) from None
    record_job(recipe.workdir, JobRecord(stage.name, "slurm", job_id, stage.fingerprint, submitted))
    return job_id
