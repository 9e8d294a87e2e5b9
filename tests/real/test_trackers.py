"""``--report-to``: every tracker writes its offline run for a 3-step train, with the run's name and options; a tracker
that cannot start is a warning, and the training ends as it would without it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.tiny import domain_corpus

pytest.importorskip("trackio")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

LOOP = ["--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-blocks", "1"]


def _train(run: Path, data: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "moekit", "train", str(run), "--data", f"code={data}", *LOOP, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


@pytest.fixture()
def run(make_seed, tmp_path) -> tuple[Path, Path]:
    seed = make_seed("llama")
    (tmp_path / "code.txt").write_text(domain_corpus("code", 200))
    done = subprocess.run(
        [sys.executable, "-m", "moekit", "branch", str(seed), str(tmp_path / "run"), "--domain", "code"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return tmp_path / "run", tmp_path / "code.txt"


def test_every_tracker_writes_its_offline_run(run, tmp_path):
    run_dir, data = run
    env = {"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_SILENT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = _train(run_dir, data, env, "--report-to", "tensorboard,trackio", "--report-to", "wandb,mlflow")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: --report-to" not in done.stderr, done.stderr[-3000:]
    work = run_dir / "train" / "code"
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    # trackio: the project's SQLite database, with the three steps' losses under the run's name, and its options
    with sqlite3.connect(tmp_path / "trackio" / "moekit.db") as connection:
        logged = connection.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
        (config,) = connection.execute("SELECT config FROM configs").fetchone()
    steps = [(name, step, json.loads(metrics)) for name, step, metrics in logged]
    steps = [(name, step, metrics) for name, step, metrics in steps if "loss" in metrics]  # eval rows have eval/*
    assert [s for _, s, _ in steps] == [1, 2, 3] and all(name.endswith(str(work)) for name, _, _ in steps)
    assert [m["loss"] for _, _, m in steps] == pytest.approx(losses)
    assert json.loads(config)["loop.seq_len"] == 32
    # wandb: an offline run directory with its run file
    offline = list((work / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("run-*.wandb"))
    # mlflow: a file store in WORK_DIR/mlruns, the loss history and the options as parameters
    loss_files = list((work / "mlruns").rglob("metrics/loss"))
    assert loss_files and len(loss_files[0].read_text().splitlines()) == 3
    params = {p.name for p in loss_files[0].parent.parent.joinpath("params").iterdir()}
    assert {"loop.lr", "loop.seq_len", "stage"} <= params


def test_a_tracker_that_cannot_start_is_a_warning(run, tmp_path):
    run_dir, data = run
    env = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens there
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    done = _train(run_dir, data, env, "--report-to", "mlflow")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("warning: --report-to mlflow: starting failed") == 1, done.stderr[-3000:]
    rows = (run_dir / "train" / "code" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in row for row in rows) == 3
