"""``moekit eval --tasks``: what it refuses, and the run page's table (the comparison with the ``lm_eval`` command
is in tests/real/test_harness_cli.py)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moekit.cli import build_app

pytest.importorskip("lm_eval")


def test_tasks_refusals(seed_and_moe, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(build_app(), ["eval", str(seed_and_moe["seed"]), "--tasks", "no_such_task_here"])
    assert unknown.exit_code == 2 and "knows no task no_such_task_here" in " ".join(unknown.output.split())
    both = runner.invoke(build_app(), ["eval", str(seed_and_moe["seed"]), "--tasks", "x", "--task", "arithmetic"])
    assert both.exit_code == 2
    stray = runner.invoke(build_app(), ["eval", str(seed_and_moe["seed"]), "--tasks-dir", str(tmp_path)])
    assert stray.exit_code == 2 and "add --tasks" in " ".join(stray.output.split()).lower()


def test_the_run_page_shows_harness_scores():
    from moekit.report.run_page import _harness

    harness = {"results": {"tuned": {"gsm8k": {"metrics": {"exact_match": {"value": 0.25, "stderr": 0.0123}}, "n": 8}}}}
    html = _harness(harness)
    assert "lm-evaluation-harness" in html and "gsm8k<br>exact_match" in html and "0.250 &plusmn; 0.012" in html
    assert _harness(None) == ""
