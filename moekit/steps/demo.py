"""``moekit demo``: the packaged demo recipe run end to end, then a generation per domain, the arithmetic accuracy
and the report.

The recipe (``moekit/recipes/demo.yaml``, or ``demo-tiny.yaml`` for tests) pretrains a small seed
here, branches, trains, mixes, tunes and builds the baselines; this step adds what a user wants
to see at the end: the tuned MoE's continuation of a prompt per domain (coloured by expert when
rendered), the arithmetic accuracy of seed, tuned and tuned+SCMoE (moekit's own task, and the demo's
lm-evaluation-harness tasks when lm-eval is installed), and the run's HTML report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import EvalConfig, GenerateConfig
from moekit.errors import MoekitError
from moekit.manifest import load_manifest
from moekit.recipe import Recipe, load_recipe
from moekit.steps.run import RunOutcome, clear_workdir, launch_recipe, run_recipe

# A prompt per demo domain for the generation samples (the tiny demo's domains have the same names).
# Prompts end at a word, not a space: a byte-level BPE attaches the space to the next word.
DEMO_PROMPTS = {
    "code": "import os\nimport sys\n\ndef",
    "prose": "The return statement",
    "math": "Ann has 12 pens and gets 30 more. How many pens does Ann have?",
}


@dataclass
class DemoResult:
    """What the demo ran and showed."""

    workdir: Path
    outcome: RunOutcome
    generations: list[tuple[str, str, Any]] = field(default_factory=list)  # (domain, prompt, Generation)
    arithmetic: dict[str, Any] | None = None  # eval --task arithmetic's report for the seed and the tuned MoE
    harness: dict[str, Any] | None = None  # lm-eval on the demo's own tasks (seed, tuned, tuned + SCMoE)
    notes: list[str] = field(default_factory=list)
    report: Path | None = None


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the moekit package (moekit/recipes/NAME.yaml)."""
    return Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml"


def run_demo(out: Path | None, tiny: bool, force: bool, overrides: list[str], log: Callable[[str], None]) -> DemoResult:
    """Run the demo recipe in ``out`` (default demo-out, or demo-tiny-out), then the generations, accuracy table and
    report."""
    name = "demo-tiny" if tiny else "demo"
    workdir = (out or Path(f"{name}-out")).absolute()
    if force:
        clear_workdir(workdir)
    recipe = load_recipe(packaged_recipe(name), [f"workdir={workdir}", *overrides])
    log(f"moekit demo ({name}): work directory {workdir}")
    result = DemoResult(workdir, _run(recipe, log))
    run_dir = workdir / "run"
    if (run_dir / "tuned" / "config.json").is_file():
        result.generations, result.arithmetic = _samples(run_dir, problems=40 if tiny else 200)
        result.harness = _harness(run_dir, problems=20 if tiny else 200, notes=result.notes)
    result.report = write_demo_report(run_dir)
    return result


def _run(recipe: Recipe, log: Callable[[str], None]) -> RunOutcome:
    """The recipe's stages, under its launcher (``launcher.kind=local`` runs the branches at once)."""
    if recipe.launcher.kind == "inline":
        return run_recipe(recipe, log=log)
    launched = launch_recipe(recipe, log=log)
    if not launched.finished:
        states = ", ".join(f"{s.stage} {s.state}" for s in launched.statuses if s.state != "done")
        raise MoekitError(
            f"The demo's stages did not all finish: {states}.",
            f"See the logs under {recipe.workdir / 'jobs' / 'logs'}; running the demo again finishes them.",
        )
    return launched.run


def _samples(run_dir: Path, problems: int) -> tuple[list[tuple[str, str, Any]], dict[str, Any]]:
    """The tuned MoE's continuation of a prompt per domain, and the arithmetic accuracy of seed / tuned /
    tuned+SCMoE."""
    from moekit.steps.evaluate_task import evaluate_task
    from moekit.steps.generate import Generator

    manifest = load_manifest(run_dir)
    tuned = run_dir / "tuned"
    generator = Generator(GenerateConfig(model=str(tuned), raw=True, max_new_tokens=24))
    generations = [
        (d, DEMO_PROMPTS[d], generator.generate(DEMO_PROMPTS[d])) for d in manifest.branches if d in DEMO_PROMPTS
    ]
    report = evaluate_task(
        EvalConfig(models=[manifest.seed.path, str(tuned)], task="arithmetic", problems=problems, scmoe=True),
        show_progress=False,
    )
    return generations, report


def _harness(run_dir: Path, problems: int, notes: list[str]) -> dict[str, Any] | None:
    """lm-evaluation-harness on the demo's own local tasks (``RUN_DIR/tasks``) for the seed, the tuned MoE and the
    tuned MoE with SCMoE; recorded in RUN_DIR/eval.json (the report shows it). None, with a note, without lm-eval."""
    import importlib.util
    import json

    from moekit.harness_tasks import write_arithmetic_tasks
    from moekit.io.outputs import write_file
    from moekit.steps.evaluate_harness import run_harness

    if importlib.util.find_spec("lm_eval") is None:
        notes.append("lm-evaluation-harness is not installed: pip install 'moekit[harness]' adds the demo's lm-eval "
                     "tasks (and moekit eval --tasks).")  # fmt: skip
        return None
    tasks = write_arithmetic_tasks(run_dir / "tasks", problems)
    seed, tuned = Path(load_manifest(run_dir).seed.path), run_dir / "tuned"
    cfg = EvalConfig(models=[str(seed), str(tuned)], tasks=tasks, tasks_dir=run_dir / "tasks", scmoe=True)
    harness = run_harness({"seed": seed, "tuned": tuned}, cfg)
    recorded = run_dir / "eval.json"
    if recorded.is_file():
        report = json.loads(recorded.read_text(encoding="utf-8"))
        report["harness"] = harness
        write_file(recorded, json.dumps(report, indent=1), "eval report", force=True)
    return harness


def write_demo_report(run_dir: Path) -> Path:
    """The run's HTML report (moekit report), with the demo's prompts for the generation samples."""
    from moekit.steps.report import report_run

    prompts = {d: DEMO_PROMPTS[d] for d in load_manifest(run_dir).branches if d in DEMO_PROMPTS}
    return report_run(run_dir, prompts=prompts or None)[1]
