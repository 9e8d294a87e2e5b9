"""A recipe run as a graph of stages: what each needs, which are done, and running one stage alone.

The launchers (``local``, ``slurm``) run each stage as a job of its own: ``moekit run RECIPE --only
STAGE``. A job starts once the stages it needs are done; the branches' trainings need only the
branch stage, so they run at the same time, and so do the two baselines after tune.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moekit.errors import MoekitError
from moekit.recipe import Recipe
from moekit.steps.run.base import RunOutcome, main_process
from moekit.steps.run.jobs import job_state
from moekit.steps.run.runner import RecipeRun, open_workdir

# The stage kinds each kind reads the outputs of ("train" stands for every train:DOMAIN stage). A kind the
# run leaves out (stages: [...]) is looked through: its own needs count instead.
NEEDS: dict[str, tuple[str, ...]] = {
    "seed": (),
    "branch": ("seed",),
    "train": ("branch",),
    "mix": ("seed", "branch", "train"),
    "average": ("branch", "train"),
    "tune": ("mix",),
    "dense": ("branch", "train", "tune"),  # its token budget is the branches' + tune's
    "upcycle": ("seed", "branch", "train", "tune"),  # its FLOP budget is the branches' + tune's
    "eval": ("branch", "train", "mix", "average", "tune", "dense", "upcycle"),
    "inspect": ("mix", "tune"),
}


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a run: its fingerprint, whether it is done, and the stages it needs."""

    name: str  # seed, branch, train:DOMAIN, mix, ...
    fingerprint: str
    done: bool
    needs: tuple[str, ...]

    @property
    def kind(self) -> str:
        """The stage's kind (``train`` for ``train:code``)."""
        return self.name.split(":")[0]


def _needs(name: str, present: list[str]) -> tuple[str, ...]:
    found: list[str] = []
    pending, seen = list(NEEDS[name.split(":")[0]]), set()
    while pending:
        kind = pending.pop(0)
        if kind in seen:
            continue
        seen.add(kind)
        matches = [stage for stage in present if stage.split(":")[0] == kind]
        if matches:
            found += [m for m in matches if m not in found]
        else:
            pending += NEEDS[kind]
    return tuple(stage for stage in present if stage in found)  # in run order


def plan_run(recipe: Recipe) -> list[PlannedStage]:
    """The stages this run of ``recipe`` has, in run order; nothing is run."""
    runner = RecipeRun(recipe, False, lambda message: None, plan=True)
    runner.run_stages()
    names = list(runner.planned)
    return [PlannedStage(n, runner.fingerprints[n], runner.planned[n], _needs(n, names)) for n in names]


def run_one_stage(recipe: Recipe, stage: str, show_progress: bool, log: Callable[[str], None]) -> RunOutcome:
    """Run ``stage`` of ``recipe`` in this process (what a launcher's job does); the stages it needs must be done."""
    open_workdir(recipe)
    plan = {p.name: p for p in plan_run(recipe)}
    if stage not in plan:
        raise MoekitError(
            f"'{stage}' is not a stage of this run of {recipe.name}.",
            f"Give one of: {', '.join(plan) or '(none: check the recipe stages)'}.",
        )
    missing = [need for need in plan[stage].needs if not plan[need].done]
    if missing:
        raise MoekitError(
            f"Stage {stage} needs {', '.join(missing)}, which {'has' if len(missing) == 1 else 'have'} not finished.",
            "Run the whole recipe (moekit run RECIPE), or those stages first (--only STAGE).",
        )
    quiet = main_process() is False  # the other processes of a torchrun job: rank 0 speaks for the job
    runner = RecipeRun(recipe, show_progress, (lambda message: None) if quiet else log, only=stage)
    with job_state(recipe.workdir, stage):
        outcome = runner.run_stages()
    _end_process_group()
    return outcome


def _end_process_group() -> None:
    """A torchrun job's process group ends with its stage (the stage's engine reused it, so did not end it)."""
    import sys

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
