"""``moekit report`` on runs that have not made every part yet (the full page is checked on the demo's run)."""

from __future__ import annotations

from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.steps.branch import branch

runner = CliRunner()


def test_report_of_a_fresh_run_says_what_is_missing(make_seed, tmp_path):
    run = branch(str(make_seed("llama")), tmp_path / "run", ["code", "math"]).run_dir
    result = runner.invoke(build_app(), ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    for section in ("stages", "curves", "evaluation", "routing", "tokens", "generations"):
        assert f'<section id="{section}">' in page
    assert "moekit eval" in page and "moekit mix" in page and "data:image/png" not in page
    assert "code, math" in page  # the branches, from the manifest


def test_report_refuses_what_is_not_a_run(tmp_path):
    result = runner.invoke(build_app(), ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "not a moekit run directory" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "nothing").exists()


def test_report_out_into_a_new_directory(make_seed, tmp_path):
    run = branch(str(make_seed("llama")), tmp_path / "run", ["code"]).run_dir
    page = tmp_path / "new" / "deeper" / "page.html"
    result = runner.invoke(build_app(), ["report", str(run), "--out", str(page)])
    assert result.exit_code == 0, result.output
    assert page.is_file()
    refused = runner.invoke(build_app(), ["report", str(run), "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "is a directory" in refused.output
