"""``moekit run`` with a launcher: check, plan, start the stages as jobs, follow them, report.

The order matters for "nothing half-written": the launcher's checks (Slurm answers, the resources
exist, the GPUs are there) come before anything is written to the work directory; then the recipe
is written, the run is planned (fingerprints: which stages are done), and only the stages that are
not done and have no live job are started. A stage that fails stops only the stages that need it;
running the recipe again starts only what is unfinished, and the trainings resume from their
checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moekit.errors import MoekitError
from moekit.io.locks import exclusive
from moekit.recipe import Recipe
from moekit.steps.run.base import RunOutcome
from moekit.steps.run.jobs import JOBS_DIR, load_jobs, log_tail
from moekit.steps.run.local_launch import LocalRun, local_slots
from moekit.steps.run.plan import plan_run
from moekit.steps.run.runner import open_workdir
from moekit.steps.run.slurm_launch import slurm_preflight, submit_stages
from moekit.steps.run.status import FINAL_STATES, StageStatus, stage_statuses


@dataclass
class LaunchOutcome:
    """How a launched run stands when ``moekit run`` returns."""

    run: RunOutcome
    launcher: str
    statuses: list[StageStatus] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)  # stage -> what happened and its log's tail
    waited: bool = True

    @property
    def finished(self) -> bool:
        """Every stage is done."""
        return all(s.state == "done" for s in self.statuses)


def launch_recipe(recipe: Recipe, log: Callable[[str], None] = lambda message: None) -> LaunchOutcome:
    """Run ``recipe`` under its launcher (``local`` or ``slurm``); see the module docstring."""
    kind = recipe.launcher.kind
    if kind == "slurm":
        slurm_preflight(recipe)
    else:
        local_slots(recipe)  # the GPUs it asks for exist
    open_workdir(recipe)
    with exclusive(recipe.workdir / JOBS_DIR / ".launch.lock", f"The recipe run in {recipe.workdir}"):
        plan = plan_run(recipe)
        if all(stage.done for stage in plan):
            log("[dim]every stage is done with the same inputs and options; nothing to run[/]")
        elif kind == "local":
            LocalRun(recipe, plan, log).run()
        else:
            submit_stages(recipe, plan, log)
    waited = kind == "local" or recipe.launcher.wait
    if kind == "slurm" and waited:
        follow(recipe, log)
    return _outcome(recipe, waited)


class StoppedFollowing(MoekitError):
    """Ctrl-C (or SIGTERM) while ``moekit run`` follows Slurm jobs: the jobs go on."""

    exit_code = 130


def follow(recipe: Recipe, log: Callable[[str], None]) -> None:
    """Log each stage's changes of state until no job of the run may still run."""
    try:
        _follow(recipe, log)
    except KeyboardInterrupt:
        raise StoppedFollowing(
            "Stopped following the run's jobs; they keep running under Slurm.",
            f"Follow them with: moekit status {recipe.workdir}; cancel them with: moekit status {recipe.workdir} "
            "--cancel.",
        ) from None


def _follow(recipe: Recipe, log: Callable[[str], None]) -> None:
    seen: dict[str, str] = {}
    while True:
        statuses, note = stage_statuses(recipe.workdir, plan_run(recipe), load_jobs(recipe.workdir))
        for status in statuses:
            first = "done" if status.state == "done" else ("pending" if status.state == "pending" else "")
            if seen.get(status.stage, first) != status.state:
                job = f" (job {status.job_id})" if status.job_id else ""
                detail = f": {status.detail}" if status.detail and status.state != "pending" else ""
                log(f"{status.stage}: {status.state}{job}{detail}")
            seen[status.stage] = status.state
        if all(s.state in FINAL_STATES or s.state == "to run" for s in statuses):
            return
        time.sleep(recipe.launcher.poll_seconds)


def _outcome(recipe: Recipe, waited: bool) -> LaunchOutcome:
    plan = plan_run(recipe)
    statuses, _ = stage_statuses(recipe.workdir, plan, load_jobs(recipe.workdir))
    done = {s.stage for s in statuses if s.state == "done"}
    for stage, status in zip(plan, statuses):  # never started because a stage it needs did not finish
        blocked = [need for need in stage.needs if need not in done]
        if status.state == "to run" and blocked and waited:
            status.state, status.detail = "not run", f"it needs {', '.join(blocked)}"
    run = RunOutcome(recipe.workdir, {s.stage: s.state for s in statuses})
    run_dir = recipe.workdir / "run"
    if (run_dir / "eval.json").is_file():
        run.eval_report = json.loads((run_dir / "eval.json").read_text())
    if (run_dir / "inspect" / "routing.json").is_file():
        run.routing = json.loads((run_dir / "inspect" / "routing.json").read_text())
    failures = {}
    for status in statuses:
        if status.state in ("failed", "cancelled", "stopped", "not run") and waited:
            tail = log_tail(status.log, 12) if status.log else ""
            failures[status.stage] = "\n".join(filter(None, [status.detail, tail]))
    return LaunchOutcome(run, recipe.launcher.kind, statuses, failures, waited)
