"""Running a recipe: every stage in order, in one process."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import yaml

from moekit.errors import MoekitError
from moekit.io.atomic import write_text_atomic
from moekit.io.outputs import WORKDIR_MARKER, is_workdir
from moekit.recipe import Recipe
from moekit.steps.run.base import RunOutcome
from moekit.steps.run.build import BuildStages
from moekit.steps.run.judge import JudgeStages


class RecipeRun(BuildStages, JudgeStages):
    """Runs one recipe; each ``stage_*`` method does one stage."""

    def run_stages(self) -> RunOutcome:
        """Every stage method, in the run's order (each runs, skips or only plans, as the run was made)."""
        for stage in (
            self.stage_seed,
            self.stage_branch,
            self.stage_train,
            self.stage_mix,
            self.stage_average,
            self.stage_tune,
            self.stage_dense,
            self.stage_upcycle,
            self.stage_eval,
            self.stage_inspect,
        ):
            stage()
        return self.outcome


RECIPE_AS_RUN = "recipe.yaml"  # the recipe as run (overrides applied, paths resolved), rewritten by every run


def check_workdir(workdir: Path, inputs: list[Path] | None = None) -> None:
    """Refuse a recipe ``workdir`` that is a file or lies under one, whose location cannot be written, that holds
    something else than an earlier recipe run, or that is, contains or lies inside an input (the seed, the data)."""
    from moekit.io.outputs import check_writable_parent, guard_output

    for path in [workdir, *workdir.parents]:
        if path.exists() and not path.is_dir():
            raise MoekitError(
                f"The recipe's workdir {workdir} cannot be created: {path} is a file.",
                "Set workdir to a directory path (workdir=DIR).",
            )
    if not workdir.is_dir():
        check_writable_parent(workdir)
    elif not os.access(workdir, os.W_OK | os.X_OK):
        raise MoekitError(
            f"The recipe's workdir {workdir} is not writable.", "Choose a workdir you can write to (workdir=DIR)."
        )
    guard_output(workdir, "workdir", True, inputs or [])  # an earlier run of a recipe is continued, nothing else


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """What a recipe reads from outside its workdir: the seed (unless it builds one) and the data."""
    from moekit.builtin_data import BUILTIN_PREFIX
    from moekit.data.sources import spec_paths

    specs = [
        s
        for domain in recipe.domains.values()
        for s in domain.data + domain.val_data
        if not s.startswith(BUILTIN_PREFIX)
    ]
    seed = (
        [Path(recipe.seed.path)]
        if recipe.seed.build is None and recipe.seed.path and Path(recipe.seed.path).exists()
        else []
    )
    return [*seed, *spec_paths(specs)]


def clear_workdir(workdir: Path) -> None:
    """Delete a recipe work directory (``demo --force``); refuse one that is not a recipe's."""
    import shutil

    if not workdir.exists():
        return
    if not workdir.is_dir() or (any(workdir.iterdir()) and not is_workdir(workdir)):
        raise MoekitError(
            f"{workdir} is not a moekit work directory (no {WORKDIR_MARKER}); --force would delete it and "
            "everything in it.",
            "Choose a new --out directory, or one an earlier demo or run wrote.",
        )
    shutil.rmtree(workdir)


def open_workdir(recipe: Recipe) -> None:
    """Check the recipe's workdir and write the recipe as run into it (and the marker that makes it a work
    directory)."""
    check_workdir(recipe.workdir, recipe_inputs(recipe))
    recipe.workdir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    as_run = recipe.workdir / RECIPE_AS_RUN
    if not as_run.is_file() or as_run.read_text(encoding="utf-8") != text:
        write_text_atomic(as_run, text)
    marker = recipe.workdir / WORKDIR_MARKER
    if not marker.is_file():
        marker.write_text("a moekit recipe's work directory\n")


def run_recipe(
    recipe: Recipe, show_progress: bool = True, log: Callable[[str], None] = lambda message: None
) -> RunOutcome:
    """Run every stage of ``recipe`` in order, in this process (skipping finished ones); return what happened."""
    open_workdir(recipe)
    return RecipeRun(recipe, show_progress, log).run_stages()
