"""What the launcher tests share: the tiny recipe, running moekit as a user does, comparing runs' weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from moekit.recipe import load_recipe
from moekit.steps.run import run_recipe

TINY = Path(__file__).parents[2] / "moekit" / "recipes" / "demo-tiny.yaml"
TWO_DOMAINS = "domains={code: {data: [builtin:code-lines]}, math: {data: [builtin:math-lines]}}"
MODELS = ("seed", "run/branches/code", "run/branches/math", "run/mixed", "run/averaged", "run/tuned")
BASELINES = ("run/dense", "run/upcycled")


def moekit(*args: object, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``moekit ARGS`` as a process (what a user runs), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "moekit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def inline_run(workdir: Path, overrides: list[str]) -> Path:
    """The same recipe run inline, in this process: the reference the launchers must match bit for bit."""
    run_recipe(load_recipe(TINY, [f"workdir={workdir}", *overrides]), show_progress=False)
    return workdir


def weights(model: Path) -> dict[str, bytes]:
    """Every weight file of a model directory, by name."""
    return {path.name: path.read_bytes() for path in sorted(model.glob("*.safetensors"))}


def assert_same_models(a: Path, b: Path, models: tuple[str, ...]) -> None:
    """The two work directories hold bit-identical weights for every model named."""
    for model in models:
        assert weights(a / model), f"{a / model} holds no weights"
        assert weights(a / model) == weights(b / model), f"{model} differs between {a} and {b}"


def job_state(workdir: Path, stage: str) -> dict:
    """What the job of ``stage`` recorded about itself ({} before it starts)."""
    path = workdir / "jobs" / "state" / f"{stage.replace(':', '-')}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def log_of(workdir: Path, stage: str) -> str:
    """The job log of ``stage``."""
    return (workdir / "jobs" / "logs" / f"{stage.replace(':', '-')}.log").read_text()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 180, every: float = 0.2) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def last_step(workdir: Path, stage: str) -> int:
    """The last training step the job of ``stage`` logged (0 before its first)."""
    from moekit.progress import parse_plain_line

    path = workdir / "jobs" / "logs" / f"{stage.replace(':', '-')}.log"
    steps = [parse_plain_line(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return max((int(s["done"]) for s in steps if s and s["what"].endswith("step")), default=0)


def status_rows(output: str) -> dict[str, list[str]]:
    """The rows of ``moekit status``'s table by stage: [stage, state, job, step, loss, tok/s, ETA, log]."""
    rows = [line.split("│")[1:-1] for line in output.splitlines() if line.count("│") > 5]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows}
