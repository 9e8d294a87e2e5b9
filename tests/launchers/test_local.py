"""``moekit run`` with ``launcher: local``: the run's stages as concurrent processes on this machine."""

from __future__ import annotations

from tests.launchers.helpers import (
    TINY,
    TWO_DOMAINS,
    assert_same_models,
    inline_run,
    job_state,
    log_of,
    moekit,
    status_rows,
)

SMALL = [TWO_DOMAINS, "stages=[seed,branch,train,mix,tune]"]
LOCAL = ["--launcher", "local", "launcher.local.max_parallel=2"]


def test_local_launcher_with_two_jobs_at_a_time_equals_inline(tmp_path):
    work = tmp_path / "local"
    result = moekit("run", TINY, f"workdir={work}", *SMALL, *LOCAL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train:code: started" in result.stdout and "tune: done" in result.stdout
    code, math = job_state(work, "train:code"), job_state(work, "train:math")
    assert max(code["started"], math["started"]) < min(code["ended"], math["ended"]), "the branches did not overlap"
    assert job_state(work, "mix")["started"] >= max(code["ended"], math["ended"])
    reference = inline_run(tmp_path / "inline", SMALL)
    assert_same_models(work, reference, ("seed", "run/branches/code", "run/branches/math", "run/mixed", "run/tuned"))

    status = moekit("status", work)
    assert status.returncode == 0, status.stderr
    rows = status_rows(status.stdout)
    assert list(rows) == ["seed", "branch", "train:code", "train:math", "mix", "tune"]
    assert all(row[1] == "done" and row[7] == f"{stage.replace(':', '-')}.log" for stage, row in rows.items())


def test_a_failed_local_job_stops_only_what_needs_it_and_the_rerun_runs_only_that(tmp_path):
    work = tmp_path / "w"
    overrides = [TWO_DOMAINS, "stages=[seed,branch,train,mix]", "launcher.local.max_parallel=1"]
    first = moekit("run", TINY, f"workdir={work}", *overrides, "--launcher", "local", "--only", "branch")
    assert first.returncode != 0 and "needs seed" in first.stderr  # --only: what it needs must be done
    assert moekit("run", TINY, f"workdir={work}", *overrides, "--only", "seed").returncode == 0
    assert moekit("run", TINY, f"workdir={work}", *overrides, "--only", "branch").returncode == 0
    weights = work / "run" / "branches" / "math" / "model.safetensors"
    kept = weights.read_bytes()
    weights.unlink()  # train:math's input is gone

    failed = moekit("run", TINY, f"workdir={work}", *overrides, "--launcher", "local")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = failed.stdout.split("stages:")[-1]
    assert "train:code done" in report and "train:math failed" in report and "mix not run" in report
    assert "model.safetensors" in report.split("\ntrain:math: ")[1]  # the log's last lines
    assert job_state(work, "train:math")["state"] == "failed" and "seed: started" not in failed.stdout

    weights.write_bytes(kept)
    fixed = moekit("run", TINY, f"workdir={work}", *overrides, "--launcher", "local")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "train:code: started" not in fixed.stdout and "train:math: started" in fixed.stdout
    assert log_of(work, "train:code").count("stage train:code on") == 1
