"""``moekit run`` with ``launcher: slurm`` on a real one-node Slurm cluster started by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.launchers.helpers import (
    BASELINES,
    MODELS,
    TINY,
    TWO_DOMAINS,
    assert_same_models,
    inline_run,
    job_state,
    last_step,
    log_of,
    moekit,
    status_rows,
    wait_for,
)

SLURM = [
    "--launcher",
    "slurm",
    "launcher.slurm.cpus_per_task=1",
    "launcher.slurm.mem=1500",
    "launcher.poll_seconds=0.5",
]


def test_branches_train_at_once_and_the_run_equals_inline(tmp_path, slurm_env):
    """Every stage a job: the two branches' jobs overlap in time, mix starts after both, and every model (the
    branches, mixed, averaged, tuned, both baselines) is bit-identical to the same recipe run inline."""
    overrides = [
        TWO_DOMAINS,
        "train.max_steps=60",
        "stages=[seed,branch,train,mix,average,tune,dense,upcycle,eval,inspect]",
    ]
    work = tmp_path / "slurm"
    result = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted job" in result.stdout and "held-out loss" in result.stdout

    jobs = json.loads((work / "jobs" / "jobs.json").read_text())["jobs"]
    stages = [
        "seed",
        "branch",
        "train:code",
        "train:math",
        "mix",
        "average",
        "tune",
        "dense",
        "upcycle",
        "eval",
        "inspect",
    ]
    assert sorted(jobs) == sorted(stages) and all(job["launcher"] == "slurm" for job in jobs.values())
    assert len({job["job_id"] for job in jobs.values()}) == len(stages)
    code, math, mix = job_state(work, "train:code"), job_state(work, "train:math"), job_state(work, "mix")
    assert {code["job_id"], math["job_id"]} == {jobs["train:code"]["job_id"], jobs["train:math"]["job_id"]}
    assert max(code["started"], math["started"]) < min(code["ended"], math["ended"]), "the branches did not overlap"
    assert mix["started"] >= max(code["ended"], math["ended"])
    for stage in ("dense", "upcycle"):
        assert job_state(work, stage)["started"] >= job_state(work, "tune")["ended"]
    assert all(job_state(work, stage)["state"] == "done" for stage in stages)

    reference = inline_run(tmp_path / "inline", overrides)
    assert_same_models(work, reference, MODELS + BASELINES)
    evaluated, expected = (json.loads((w / "run" / "eval.json").read_text()) for w in (work, reference))
    assert {k: v for k, v in evaluated.items() if k != "models"} == {k: v for k, v in expected.items() if k != "models"}

    again = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM)  # nothing left: nothing submitted
    assert again.returncode == 0 and "submitted" not in again.stdout and "nothing to run" in again.stdout


def _job_id(work, stage: str) -> str:
    return json.loads((work / "jobs" / "jobs.json").read_text())["jobs"][stage]["job_id"]


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def test_scancel_and_requeue_mid_training_then_the_rerun_resumes(tmp_path, slurm_env):
    """One branch's job cancelled (scancel), the other sent the scheduler's stop signal (USR1, as before a time
    limit): the second checkpoints, requeues itself and resumes; the first is reported, mix is cancelled by Slurm;
    running the recipe again resumes the cancelled branch from its checkpoint, does not retrain the other, and
    the result is bit-identical to an uninterrupted inline run. ``moekit status`` follows it all."""
    overrides = [TWO_DOMAINS, "train.max_steps=800", "train.save_every=20", "stages=[seed,branch,train,mix]"]
    work = tmp_path / "slurm"
    submitted = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM, "launcher.progress_every=0", "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "moekit status" in submitted.stdout

    wait_for(lambda: last_step(work, "train:code") >= 45 and last_step(work, "train:math") >= 45, "both branches")
    status = moekit("status", work / "run")
    assert status.returncode == 0, status.stderr
    rows = status_rows(status.stdout)
    for stage in ("train:code", "train:math"):
        state, job, step, loss, speed, eta = rows[stage][1:7]
        assert state == "running" and job == _job_id(work, stage) and step.endswith("/800")
        assert float(loss) > 0 and int(speed.replace(",", "")) > 0 and eta.count(":") == 2
    assert rows["branch"][1] == "done" and rows["mix"][1] == "pending"

    code, math = _job_id(work, "train:code"), _job_id(work, "train:math")
    subprocess.run(["scancel", code], check=True)
    subprocess.run(["scancel", "--signal=USR1", "--batch", math], check=True)
    wait_for(lambda: job_state(work, "train:math").get("state") == "stopped", "train:math to stop at a checkpoint")
    wait_for(lambda: _squeue_state(math) == "PENDING", "train:math to be requeued")
    # Slurm holds a requeued job ~2 minutes; release it sooner, but a few seconds on: slurmd refuses a start within
    # the second its old credential was revoked ("Job credential revoked").
    subprocess.run(["scontrol", "update", f"JobId={math}", "StartTime=now+3"], check=True)
    wait_for(lambda: job_state(work, "train:math").get("state") == "done", "the requeued train:math", timeout=300)
    math_log = log_of(work, "train:math")
    assert "attempt 2" in math_log and "requeueing" in math_log and "resuming at step" in math_log

    status = moekit("status", work)
    rows = status_rows(status.stdout)
    assert rows["train:code"][1] == "cancelled" and rows["train:math"][1] == "done"
    wait_for(lambda: status_rows(moekit("status", work).stdout)["mix"][1] == "cancelled", "mix cancelled")

    rerun = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "train:code: submitted" in rerun.stdout and "train:math: submitted" not in rerun.stdout
    assert log_of(work, "train:math").count("stage train:math on") == 2  # its two attempts, no third
    code_log = log_of(work, "train:code")
    assert code_log.count("stage train:code on") == 2 and "resuming at step" in code_log.split("attempt 1")[-1]

    reference = inline_run(tmp_path / "inline", overrides)
    assert_same_models(work, reference, ("run/branches/code", "run/branches/math", "run/mixed"))


def test_a_failed_branch_job_is_reported_and_nothing_else_is_redone(tmp_path, slurm_env):
    """A branch job whose input is gone (its branch's weights, deleted while the job waited) fails alone: the
    following moekit run reports it with its log's last lines and exits 1, the other branch is trained, mix is
    cancelled by Slurm; with the input back, running the recipe again runs only the failed branch and mix."""
    overrides = [TWO_DOMAINS, "stages=[seed,branch,train,mix]"]
    work = tmp_path / "w"
    submitted = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM, "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    math_job = _job_id(work, "train:math")
    subprocess.run(["scontrol", "hold", math_job], check=True)
    wait_for(lambda: job_state(work, "branch").get("state") == "done", "branch")
    weights = work / "run" / "branches" / "math" / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()

    follower = subprocess.Popen(
        [sys.executable, "-m", "moekit", "run", TINY, f"workdir={work}", *overrides, *SLURM],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    wait_for(lambda: job_state(work, "train:code").get("state") == "done", "train:code")
    subprocess.run(["scontrol", "release", math_job], check=True)
    output, _ = follower.communicate(timeout=300)
    assert follower.returncode == 1, output
    assert f"train:math: job {math_job} is already submitted" in output and "submitted job" not in output
    report = output.split("stages:")[-1]
    assert "train:code done" in report and "train:math failed" in report and "mix cancelled" in report
    failure = report.split("\ntrain:math: ")[1]
    assert "error: transformers cannot load" in failure and "model.safetensors" in failure  # its log's last lines
    assert job_state(work, "train:math")["state"] == "failed"

    weights.write_bytes(kept)
    fixed = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "train:code: submitted" not in fixed.stdout and "train:math: submitted" in fixed.stdout
    assert log_of(work, "train:code").count("stage train:code on") == 1


def test_a_training_stage_runs_under_srun_and_torchrun(tmp_path, slurm_env):
    """processes_per_node: 2 runs a branch's training as two processes (srun + torchrun, c10d rendezvous, gloo)."""
    overrides = [
        "domains={code: {data: [builtin:code-lines]}}",
        "stages=[seed,branch,train]",
        "launcher.slurm.stages={train: {processes_per_node: 2, cpus_per_task: 2}}",
    ]
    work = tmp_path / "w"
    result = moekit("run", TINY, f"workdir={work}", *overrides, *SLURM)
    assert result.returncode == 0, result.stdout + result.stderr
    script = (work / "jobs" / "scripts" / "train-code.sbatch").read_text()
    assert "srun" in script and "--nproc-per-node=2" in script and "--cpus-per-task=2" in script
    from moekit.manifest import load_manifest

    stages = load_manifest(work / "run").stages
    trains = [s for s in stages if s.stage == "train"]
    assert len(trains) == 1 and [s.stage for s in stages].count("run:train:code") == 1  # recorded by rank 0 alone
    assert trains[0].outputs["tokens"] == 30 * 8 * 64 * 2  # steps x batch x seq_len x 2 processes
    assert job_state(work, "train:code")["state"] == "done"


@pytest.mark.parametrize(
    "override, said",
    [
        ("launcher.slurm.cpus_per_task=64", "Slurm cannot run stage seed"),
        ("launcher.slurm.stages={train: {partition: nowhere}}", "Slurm cannot run stage train:code"),
    ],
)
def test_resources_the_cluster_cannot_give_are_refused_before_anything_is_written(tmp_path, slurm_env, override, said):
    work = tmp_path / "w"
    result = moekit("run", TINY, f"workdir={work}", *SLURM, override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in result.stderr and "CPUs" in result.stderr  # the nodes the cluster has
    assert not work.exists()


def test_a_slurm_that_does_not_answer_is_refused_before_anything_is_written(tmp_path, slurm_cluster):
    dead = tmp_path / "dead.conf"
    port = next(line for line in slurm_cluster.conf.read_text().splitlines() if line.startswith("SlurmctldPort"))
    dead.write_text(slurm_cluster.conf.read_text().replace(port, "SlurmctldPort=9"))
    work = tmp_path / "w"
    result = moekit("run", TINY, f"workdir={work}", *SLURM, env={"SLURM_CONF": str(dead), "MOEKIT_SLURM_TIMEOUT": "4"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Slurm does not answer" in result.stderr or "did not answer" in result.stderr
    assert not work.exists()
