"""The ``lm_eval`` command agrees with ``moekit eval --tasks``: lm-evaluation-harness through moekit (models as moekit
loads them) and through its own CLI (on the saved directories) give the same numbers, offline, on the demo's own
local tasks. Here, in the tier CI runs, because it starts lm-eval's CLI twice (about a minute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.harness_tasks import CHOICE_TASK, GENERATE_TASK, write_arithmetic_tasks

pytest.importorskip("lm_eval")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _lm_eval_cli(model: Path, tasks: Path, out: Path) -> dict:
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
        "--tasks", f"{GENERATE_TASK},{CHOICE_TASK}", "--include_path", str(tasks), "--device", "cpu",
        "--batch_size", "8", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = list(out.rglob("results_*.json"))
    return json.loads(found.read_text())["results"]


def test_eval_tasks_match_the_lm_eval_command(seed_and_moe, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = tmp_path / "tasks"
    write_arithmetic_tasks(tasks, 12)  # the demo's own tasks: generate-until with a regex filter, multiple choice
    report_path = tmp_path / "eval.json"
    result = CliRunner().invoke(
        build_app(),
        [
            "eval", str(seed_and_moe["seed"]), str(seed_and_moe["moe"]), "--tasks", f"{GENERATE_TASK},{CHOICE_TASK}",
            "--tasks-dir", str(tasks), "--scmoe", "--json", str(report_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "lm-evaluation-harness" in result.output
    harness = json.loads(report_path.read_text())["harness"]["results"]
    # eval labels models by their directory names
    labels = {seed_and_moe["seed"].name: seed_and_moe["seed"], seed_and_moe["moe"].name: seed_and_moe["moe"]}
    assert set(harness) == {*labels, f"{seed_and_moe['moe'].name} (SCMoE)"}  # SCMoE for the MoE only
    for label, directory in labels.items():
        reference = _lm_eval_cli(directory, tasks, tmp_path / f"cli-{label}")
        ours = harness[label]
        assert ours[CHOICE_TASK]["n"] == 12 and ours[GENERATE_TASK]["n"] == 12
        checked = (
            (GENERATE_TASK, "exact_match (first-number)", "exact_match", "first-number"),
            (CHOICE_TASK, "acc", "acc", "none"),
            (CHOICE_TASK, "acc_norm", "acc_norm", "none"),
        )
        for task, ours_name, name, kept in checked:
            got = ours[task]["metrics"][ours_name]
            assert got["value"] == pytest.approx(reference[task][f"{name},{kept}"]), (label, task, name)
            assert got["stderr"] == pytest.approx(reference[task][f"{name}_stderr,{kept}"]), (label, task, name)
