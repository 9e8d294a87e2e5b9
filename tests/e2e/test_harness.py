"""``moekit eval --tasks``: lm-evaluation-harness on the models as moekit loads them, offline, on local task files;
the same numbers as the ``lm_eval`` command on the saved directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import perturb_model

pytest.importorskip("lm_eval")

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_tasks(folder: Path) -> Path:
    """Two local tasks: arithmetic answers (generate_until, exact match) and a two-way multiple choice."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "arith.jsonl", "w") as handle:
        for a in range(12):
            handle.write(json.dumps({"question": f"{a} + {a + 1} =", "answer": str(2 * a + 1)}) + "\n")
    with open(folder / "mc.jsonl", "w") as handle:
        for a in range(12):
            choices = [f" {a} {a + 1} {a + 2}", f" {a} dict return {a}"]
            handle.write(json.dumps({"context": f"count: {a}", "choices": choices, "label": 0}) + "\n")
    (folder / "arith.yaml").write_text(
        f"""task: moekit_test_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "arith.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    (folder / "mc.yaml").write_text(
        f"""task: moekit_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    return folder


@pytest.fixture()
def models(make_seed, tmp_path) -> dict[str, Path]:
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    moe = mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=list(run.branches.items()))).out
    return {"seed": seed, "moe": moe}


def _lm_eval_cli(model: Path, tasks: Path, out: Path) -> dict:
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
        "--tasks", "moekit_test_arith,moekit_test_mc", "--include_path", str(tasks), "--device", "cpu",
        "--batch_size", "8", "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = list(out.rglob("results_*.json"))
    return json.loads(found.read_text())["results"]


def test_eval_tasks_match_the_lm_eval_command(models, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    tasks = write_tasks(tmp_path / "tasks")
    report_path = tmp_path / "eval.json"
    result = CliRunner().invoke(
        build_app(),
        [
            "eval", str(models["seed"]), str(models["moe"]), "--tasks", "moekit_test_arith,moekit_test_mc",
            "--tasks-dir", str(tasks), "--scmoe", "--json", str(report_path),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "lm-evaluation-harness" in result.output
    harness = json.loads(report_path.read_text())["harness"]["results"]
    labels = {models["seed"].name: models["seed"], models["moe"].name: models["moe"]}  # labels: directory names
    assert set(harness) == {*labels, f"{models['moe'].name} (SCMoE)"}  # SCMoE for the MoE only
    for label, directory in labels.items():
        reference = _lm_eval_cli(directory, tasks, tmp_path / f"cli-{label}")
        ours = harness[label]
        assert ours["moekit_test_mc"]["n"] == 12 and ours["moekit_test_arith"]["n"] == 12
        for task, metric in (("moekit_test_arith", "exact_match"), ("moekit_test_mc", "acc"), ("moekit_test_mc",
                                                                                              "acc_norm")):  # fmt: skip
            got = ours[task]["metrics"][metric]
            assert got["value"] == pytest.approx(reference[task][f"{metric},none"]), (label, task, metric)
            assert got["stderr"] == pytest.approx(reference[task][f"{metric}_stderr,none"]), (label, task, metric)


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
