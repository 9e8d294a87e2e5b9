"""``moekit run``: a recipe's stages in order, skipping what is done, resuming what was interrupted.

Layout under the recipe's ``workdir``: ``seed/`` (when the recipe builds its seed), ``data/``
(built-in data, materialised once), ``run/`` (the run directory: manifest, branches, mixed,
averaged, tuned, eval.json, inspect/), ``jobs/`` (under a launcher: the jobs' records, scripts and
logs). Each stage has a fingerprint: a hash of its options, its data (paths, sizes, mtimes) and
the fingerprints of the stages it depends on. A finished stage records its fingerprint in the run
manifest (``run:<stage>``); when the output exists and the fingerprint matches, the stage is
skipped. Train and tune run with ``resume``, so an interrupted run continues from its last
checkpoint.

Files: ``base.py`` (bookkeeping), ``build.py`` and ``judge.py`` (the stages), ``runner.py`` (all
stages in this process), ``plan.py`` (the stage graph; one stage alone), ``launch.py`` (running the
stages as jobs), ``local_launch.py`` and ``slurm_launch.py`` (the two launchers), ``jobs.py`` (what
the jobs record), ``status.py`` (``moekit status``).
"""

from moekit.steps.run.base import RunOutcome, claim_work_dir
from moekit.steps.run.launch import LaunchOutcome, launch_recipe
from moekit.steps.run.plan import plan_run, run_one_stage
from moekit.steps.run.runner import RecipeRun, check_workdir, clear_workdir, run_recipe
from moekit.steps.run.status import cancel_run, run_status

__all__ = [
    "LaunchOutcome",
    "RecipeRun",
    "RunOutcome",
    "cancel_run",
    "check_workdir",
    "claim_work_dir",
    "clear_workdir",
    "launch_recipe",
    "plan_run",
    "run_one_stage",
    "run_recipe",
    "run_status",
]
