"""``moekit eval --tasks``: what it refuses, and the run page's table (the comparison with the ``lm_eval`` command
is in tests/real/test_harness_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import perturb_model

pytest.importorskip("lm_eval")


@pytest.fixture()
def models(make_seed, tmp_path) -> dict[str, Path]:
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    moe = mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=list(run.branches.items()))).out
    return {"seed": seed, "moe": moe}


def test_tasks_refusals(models, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(build_app(), ["eval", str(models["seed"]), "--tasks", "no_such_task_here"])
    assert unknown.exit_code == 2 and "knows no task no_such_task_here" in " ".join(unknown.output.split())
    both = runner.invoke(build_app(), ["eval", str(models["seed"]), "--tasks", "x", "--task", "arithmetic"])
    assert both.exit_code == 2
    stray = runner.invoke(build_app(), ["eval", str(models["seed"]), "--tasks-dir", str(tmp_path)])
    assert stray.exit_code == 2 and "add --tasks" in " ".join(stray.output.split()).lower()


def test_the_run_page_shows_harness_scores():
    from moekit.report.run_page import _harness

    harness = {"results": {"tuned": {"gsm8k": {"metrics": {"exact_match": {"value": 0.25, "stderr": 0.0123}}, "n": 8}}}}
    html = _harness(harness)
    assert "lm-evaluation-harness" in html and "gsm8k<br>exact_match" in html and "0.250 &plusmn; 0.012" in html
    assert _harness(None) == ""
