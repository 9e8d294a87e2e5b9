"""The bookkeeping of a recipe run: fingerprints, skipping finished stages, recording them in the run manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.builtin_data import BUILTIN_PREFIX, materialize
from moekit.data import spec_fingerprint
from moekit.manifest import MANIFEST_NAME, StageRecord, load_manifest, updating_manifest
from moekit.recipe import Recipe


@dataclass
class RunOutcome:
    """What each stage did (ran or skipped), and the eval and inspect reports."""

    workdir: Path
    stages: dict[str, str] = field(default_factory=dict)
    eval_report: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None


def main_process() -> bool:
    """Whether this is the main process of its job (rank 0 under torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def stage_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def claim_work_dir(work_dir: Path, fingerprint: str) -> bool:
    """Mark ``work_dir`` as holding the work of ``fingerprint``; return True if it held other work.

    Checkpoints left by an interrupted stage with the same fingerprint are resumed; those of a
    stage whose inputs or options have changed since are deleted, so the stage starts over.
    """
    import shutil

    marker = work_dir / "moekit-stage.json"
    stale = marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fingerprint
    if stale:
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}))
    return stale


class RunBase:
    """A recipe run's state and bookkeeping; the stages are methods of the subclasses.

    ``only`` runs that one stage (its upstream stages must be done) and ``plan`` runs none: every
    stage method still computes its fingerprint and whether it is done (``planned``), which is how
    a launcher learns what is left to run.
    """

    def __init__(
        self,
        recipe: Recipe,
        show_progress: bool,
        log: Callable[[str], None],
        only: str | None = None,
        plan: bool = False,
    ) -> None:
        self.recipe, self.show_progress, self.log = recipe, show_progress, log
        self.only, self.plan = only, plan
        self.planned: dict[str, bool] = {}  # stage -> done (with the current fingerprint), in run order
        self.workdir = recipe.workdir
        self.run_dir = self.workdir / "run"
        self.outcome = RunOutcome(self.workdir)
        self.data = {d: [self._local(s) for s in dom.data] for d, dom in recipe.domains.items()}
        self.val_data = {d: [self._local(s) for s in dom.val_data] for d, dom in recipe.domains.items() if dom.val_data}
        self.fingerprints: dict[str, str] = {}

    def _local(self, spec: str) -> str:
        return str(materialize(spec, self.workdir / "data")) if spec.startswith(BUILTIN_PREFIX) else spec

    def _data_print(self, domains: dict[str, list[str]]) -> str:
        """Fingerprint of the data (and held-out data) of ``domains``."""

        def prints(specs: list[str]) -> list[str]:
            return [spec_fingerprint(s, self.recipe.text_field) for s in specs]

        return stage_hash({d: [prints(specs), prints(self.val_data.get(d, []))] for d, specs in domains.items()})

    # ----- bookkeeping ----------------------------------------------------------------------
    def _done(self, stage: str, output: Path) -> bool:
        if not output.exists() or not (self.run_dir / MANIFEST_NAME).is_file():
            return False
        records = [s for s in load_manifest(self.run_dir).stages if s.stage == f"run:{stage}"]
        return bool(records) and records[-1].params.get("fingerprint") == self.fingerprints[stage]

    def _record(self, stage: str) -> None:
        with updating_manifest(self.run_dir) as manifest:
            manifest.stages.append(
                StageRecord(
                    stage=f"run:{stage}", params={"fingerprint": self.fingerprints[stage], "recipe": self.recipe.name}
                )
            )

    def _stage(
        self,
        stage: str,
        output: Path,
        fingerprint: str,
        work: Callable[[], None],
        done: Callable[[], bool] | None = None,
    ) -> None:
        """Run ``stage`` unless it is done (``done``, by default: its output exists and the run records its
        fingerprint); under ``plan`` or ``only`` (another stage), only note its fingerprint and whether it is done."""
        self.fingerprints[stage] = fingerprint
        if stage != "seed" and stage.split(":")[0] not in self.recipe.stages:  # a recipe's own seed is always built
            return
        finished = done() if done is not None else self._done(stage, output)
        self.planned[stage] = finished
        if self.plan or (self.only is not None and stage != self.only):
            return
        if finished:
            self.outcome.stages[stage] = "skipped (done, inputs unchanged)"
            self.log(f"[dim]{stage}: done earlier with the same inputs and options; skipped[/]")
            return
        self.log(f"[bold]{stage}[/] ...")
        work()
        if (self.run_dir / MANIFEST_NAME).is_file() and done is None and main_process():
            self._record(stage)
        self.outcome.stages[stage] = "ran"

    def _main_first(self, prepare: Callable[[], None]) -> None:
        """Run ``prepare`` (a stage's bookkeeping before it trains: claiming its work directory, relinking a
        branch) in the main process only, while the others of a torchrun job wait for it."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            prepare()
            return
        from moekit.train.engine import make_engine

        engine = make_engine()  # the job's process group (the stage's own engine reuses it)
        if engine.is_main_process:
            prepare()
        engine.wait_for_everyone()

    # ----- stages ---------------------------------------------------------------------------
    def seed_dir(self) -> Path:
        """The seed's directory (built under workdir/seed, or the recipe's path)."""
        from moekit.io.source import resolve_model_dir

        return self.workdir / "seed" if self.recipe.seed.build else resolve_model_dir(self.recipe.seed.path or "")
