"""The launchers' refusals (before anything is written), ``--only`` and ``moekit status`` on bad input; the
launchers at work (local processes, a real Slurm cluster) are the launcher tier, tests/launchers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.launchers.helpers import TINY, moekit


def test_only_rejects_an_unknown_stage(tmp_path):
    result = moekit("run", TINY, f"workdir={tmp_path / 'w'}", "--only", "train:nope")
    assert result.returncode == 2 and "not a stage of this run" in result.stderr and "train:code" in result.stderr


@pytest.mark.parametrize(
    "arguments, said",
    [
        (["--launcher", "pbs"], "launcher.kind: Input should be 'inline', 'local' or 'slurm'"),
        (["launcher.local.gpus_per_job=1"], "this machine shows 0 GPU(s)"),
        (["launcher.slurm.stages={trian: {nodes: 2}}"], "unknown stage trian"),
        (["launcher.slurm.mem=lots"], "is not a Slurm memory size"),
        (["launcher.slurm.time=4h"], "is not a Slurm time limit"),
        (["launcher.slurm.extra=[constraint=a100]"], "is not one sbatch option"),
    ],
)
def test_bad_launcher_settings_are_refused_before_anything_is_written(tmp_path, arguments, said):
    work = tmp_path / "w"
    launcher = [] if any(a.startswith("--launcher") for a in arguments) else ["--launcher", "local"]
    result = moekit("run", TINY, f"workdir={work}", *launcher, *arguments, env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in result.stderr
    assert not work.exists()


def test_the_slurm_launcher_without_slurm_on_path_is_refused_before_anything_is_written(tmp_path):
    work = tmp_path / "w"
    python_only = str(Path(os.sys.executable).parent)  # moekit's own venv, no Slurm commands
    result = moekit("run", TINY, f"workdir={work}", "--launcher", "slurm", env={"PATH": python_only})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not on PATH" in result.stderr and "sbatch" in result.stderr and "launcher.kind local" in result.stderr
    assert not work.exists()


def test_status_of_something_that_is_not_a_run(tmp_path):
    result = moekit("status", tmp_path)
    assert result.returncode == 2 and "is not a recipe run" in result.stderr
