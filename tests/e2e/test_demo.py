"""The README's main command (``moekit demo``) and recipe runs: stages, skipping, resuming."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.io.checkpoint import Checkpoint
from moekit.manifest import load_manifest
from moekit.recipe import load_recipe
from moekit.steps.run import run_recipe
from tests.e2e import browser

MOEKIT = shutil.which("moekit", path=str(Path(sys.executable).parent)) or "moekit"
TINY = Path(__file__).parents[2] / "moekit" / "recipes" / "demo-tiny.yaml"


def test_tiny_demo_through_the_console_script(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(
        [MOEKIT, "demo", "--tiny", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    for path in (
        "branches/code/config.json",
        "mixed/config.json",
        "averaged/config.json",
        "tuned/config.json",
        "eval.json",
        "inspect/routing.json",
        "inspect/report.html",
        "inspect/load.png",
    ):
        assert (run / path).is_file(), path
    stages = [s.stage for s in load_manifest(run).stages]
    for stage in ("branch", "train", "mix", "tune", "run:train:code", "run:mix", "run:tune", "run:eval", "run:inspect"):
        assert stage in stages, stage
    report = json.loads((run / "eval.json").read_text())
    assert list(report["results"]) == [
        "seed",
        "branch code",
        "branch math",
        "branch prose",
        "averaged",
        "mixed",
        "tuned",
    ]
    assert report["domains"] == ["code", "math", "prose"]
    for domain in report["domains"]:  # each branch is the best branch on its own domain
        branches = {d: report["results"][f"branch {d}"][domain]["loss"] for d in report["domains"]}
        assert min(branches, key=branches.get) == domain
    shown = first.stdout.replace("\n", " ")
    for domain in report["domains"]:  # a generation per domain with its routing, then the arithmetic accuracy
        assert f"{domain} prompt" in shown
    assert "top expert per generated token" in shown
    assert "exact-match" in shown and "SCMoE" in shown
    harness = json.loads((run / "eval.json").read_text())["harness"]["results"]  # lm-eval on the demo's own tasks
    assert set(harness) == {"seed", "tuned", "tuned (SCMoE)"}
    assert harness["tuned"]["moekit_arithmetic_choice"]["n"] == 20 and "lm-evaluation-harness" in shown
    check_report(run / "report.html", shown, tmp_path)
    second = subprocess.run(
        [MOEKIT, "demo", "--tiny", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    summary = next(line for line in second.stdout.replace("\n", " ").split("stages: ")[1:])
    assert " ran" not in summary.split("held-out")[0], summary  # every stage skipped


SECTIONS = ["stages", "curves", "evaluation", "routing", "tokens", "generations"]


def check_report(page: Path, shown: str, work: Path) -> None:
    """The demo's HTML report: every section with its content, and (with chromium) every image rendered."""
    assert f"Report: {page}" in shown  # on one line, whatever the terminal width
    tuned = page.parent / "tuned"
    assert f"moekit generate {tuned} --prompt" in shown and f"vllm serve {tuned}" in shown  # how to use the MoE
    text = page.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in text, section
    assert 'class="note"' not in text  # nothing missing: eval, routing and generations are all there
    assert "&#9733;" in text  # the best model per domain is marked
    assert text.count("data:image/png;base64,") >= 6  # curves, bars, 5 heatmaps
    assert 'src="http' not in text and 'href="http' not in text  # self-contained
    for domain in ("code", "math", "prose"):
        assert f"<h3>{domain}</h3>" in text
    if browser.chromium_or_none() is None:
        return
    images, sections, shot = browser.render(page, work)
    assert sections == SECTIONS
    assert len(images) >= 6 and "broken" not in images, images
    assert shot.is_file() and shot.stat().st_size > 50_000


def test_a_run_killed_in_train_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = run_recipe(load_recipe(TINY, [f"workdir={tmp_path / 'straight'}"]), show_progress=False)
    import moekit.steps.train as train_step

    real = train_step.run_loop
    calls = {"n": 0}

    def crash_in_second_branch(job, engine):
        calls["n"] += 1
        if calls["n"] == 2:
            job.on_step_end = lambda step, row: (_ for _ in ()).throw(KeyboardInterrupt) if step == 15 else None
        return real(job, engine)

    monkeypatch.setattr(train_step, "run_loop", crash_in_second_branch)
    recipe = load_recipe(TINY, [f"workdir={tmp_path / 'killed'}"])
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, show_progress=False)
    assert (tmp_path / "killed" / "run" / "train" / "math" / "checkpoints" / "step-10").is_dir()
    steps = []

    def counting(job, engine):  # the resumed math branch must continue after step-10, not start over
        job.on_step_end = lambda step, row: steps.append(step)
        return real(job, engine)

    monkeypatch.setattr(train_step, "run_loop", counting)
    resumed = run_recipe(recipe, show_progress=False)
    assert steps[0] == 11 and steps[-1] == 30
    monkeypatch.setattr(train_step, "run_loop", real)
    assert resumed.stages["train:code"].startswith("skipped") and resumed.stages["train:math"] == "ran"
    a, b = (Checkpoint(tmp_path / d / "run" / "tuned") for d in ("straight", "killed"))
    for name in a.tensors:
        assert torch.allclose(a.get(name), b.get(name), atol=1e-5), name
    for model, scores in straight.eval_report["results"].items():
        for domain, values in scores.items():
            assert values["loss"] == pytest.approx(resumed.eval_report["results"][model][domain]["loss"], abs=1e-4)


def test_average_is_the_mean_of_the_branches(tmp_path):
    outcome = run_recipe(
        load_recipe(TINY, [f"workdir={tmp_path / 'w'}", "stages=[seed,branch,train,average]"]), show_progress=False
    )
    assert "average" in outcome.stages
    run = tmp_path / "w" / "run"
    branches = [Checkpoint(run / "branches" / d) for d in ("code", "math", "prose")]
    averaged = Checkpoint(run / "averaged")
    for name in averaged.tensors:
        mean = sum(b.get(name).float() for b in branches) / 3
        assert torch.allclose(averaged.get(name).float(), mean, atol=1e-6), name


def test_changed_train_options_retrain_from_the_seed(tmp_path):
    """Re-running with other train options must equal a fresh run with them, not train further."""
    stages, small = "stages=[seed,branch,train]", ["train.max_steps=4", "train.eval_every=0"]
    run_recipe(load_recipe(TINY, [f"workdir={tmp_path / 'a'}", stages, *small]), show_progress=False)
    changed = run_recipe(
        load_recipe(TINY, [f"workdir={tmp_path / 'a'}", stages, *small, "train.max_steps=6"]), show_progress=False
    )
    assert changed.stages["train:code"] == "ran" and changed.stages["branch"].startswith("skipped")
    run_recipe(
        load_recipe(TINY, [f"workdir={tmp_path / 'b'}", stages, *small, "train.max_steps=6"]), show_progress=False
    )
    for domain in ("code", "math"):
        a, b = (Checkpoint(tmp_path / w / "run" / "branches" / domain) for w in ("a", "b"))
        for name in a.tensors:
            assert torch.allclose(a.get(name), b.get(name), atol=1e-6), (domain, name)
