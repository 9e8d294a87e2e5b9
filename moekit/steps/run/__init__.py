"""``moekit run``: a recipe's stages in order, skipping what is done, resuming what was interrupted.

Layout under the recipe's ``workdir``: ``seed/`` (when the recipe builds its seed), ``data/``
(built-in data, materialised once), ``run/`` (the run directory: manifest, branches, mixed,
averaged, tuned, eval.json, inspect/). Each stage has a fingerprint: a hash of its options, its
data (paths, sizes, mtimes) and the fingerprints of the stages it depends on. A finished stage
records its fingerprint in the run manifest (``run:<stage>``); when the output exists and the
fingerprint matches, the stage is skipped. Train and tune run with ``resume``, so an interrupted
run continues from its last checkpoint.
"""

from moekit.steps.run.base import RunOutcome, claim_work_dir
from moekit.steps.run.runner import RecipeRun, check_workdir, clear_workdir, run_recipe

__all__ = ["RecipeRun", "RunOutcome", "check_workdir", "claim_work_dir", "clear_workdir", "run_recipe"]
