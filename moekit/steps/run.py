"""``moekit run``: a recipe's stages in order, skipping what is done, resuming what was interrupted.

Layout under the recipe's ``workdir``: ``seed/`` (when the recipe builds its seed), ``data/``
(built-in data, materialised once), ``run/`` (the run directory: manifest, branches, mixed,
averaged, tuned, eval.json, inspect/). Each stage has a fingerprint: a hash of its options, its
data (paths, sizes, mtimes) and the fingerprints of the stages it depends on. A finished stage
records its fingerprint in the run manifest (``run:<stage>``); when the output exists and the
fingerprint matches, the stage is skipped. Train and tune run with ``resume``, so an interrupted
run continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moekit.builtin_data import BUILTIN_PREFIX, materialize
from moekit.config import EvalConfig, InspectConfig, MixConfig, TrainConfig, TuneConfig
from moekit.data import absolute_spec, spec_fingerprint
from moekit.errors import MoekitError
from moekit.manifest import MANIFEST_NAME, StageRecord, load_manifest, updating_manifest
from moekit.recipe import Recipe


@dataclass
class RunOutcome:
    """What each stage did (ran or skipped), and the eval and inspect reports."""

    workdir: Path
    stages: dict[str, str] = field(default_factory=dict)
    eval_report: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None


def _hash(*parts: Any) -> str:
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


class RecipeRun:
    """Runs one recipe; each ``stage_*`` method does one stage."""

    def __init__(self, recipe: Recipe, show_progress: bool, log: Callable[[str], None]) -> None:
        self.recipe, self.show_progress, self.log = recipe, show_progress, log
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

        return _hash({d: [prints(specs), prints(self.val_data.get(d, []))] for d, specs in domains.items()})

    # ----- bookkeeping ----------------------------------------------------------------------
    def _done(self, stage: str, output: Path) -> bool:
        if not output.exists() or not (self.run_dir / MANIFEST_NAME).is_file():
            return False
        records = [s for s in load_manifest(self.run_dir).stages if s.stage == f"run:{stage}"]
        return bool(records) and records[-1].params.get("fingerprint") == self.fingerprints[stage]

    def _record(self, stage: str) -> None:
        with updating_manifest(self.run_dir) as manifest:
            manifest.stages.append(StageRecord(stage=f"run:{stage}", params={"fingerprint": self.fingerprints[stage], "recipe": self.recipe.name}))

    def _stage(self, stage: str, output: Path, fingerprint: str, work: Callable[[], None]) -> None:
        self.fingerprints[stage] = fingerprint
        if stage.split(":")[0] not in self.recipe.stages:
            return
        if self._done(stage, output):
            self.outcome.stages[stage] = "skipped (done, inputs unchanged)"
            self.log(f"[dim]{stage}: done earlier with the same inputs and options; skipped[/]")
            return
        self.log(f"[bold]{stage}[/] ...")
        work()
        if (self.run_dir / MANIFEST_NAME).is_file():
            self._record(stage)
        self.outcome.stages[stage] = "ran"

    # ----- stages ---------------------------------------------------------------------------
    def seed_dir(self) -> Path:
        """The seed's directory (built under workdir/seed, or the recipe's path)."""
        from moekit.io.source import resolve_model_dir

        return self.workdir / "seed" if self.recipe.seed.build else resolve_model_dir(self.recipe.seed.path or "")

    def stage_seed(self) -> None:
        spec = self.recipe.seed
        if spec.build is None:
            self.fingerprints["seed"] = _hash(str(self.seed_dir()))
            return
        out = self.workdir / "seed"
        pretrain_data = {"pretrain": [self._local(s) for s in spec.pretrain_data]} if spec.pretrain_data else self.data
        fingerprint = _hash(spec.model_dump(mode="json"), self._data_print(pretrain_data) if spec.build == "pretrained-small" else "")
        marker = out / "moekit-seed.json"
        self.fingerprints["seed"] = fingerprint
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint:
            self.outcome.stages["seed"] = "skipped (done, inputs unchanged)"
            return
        self.log("[bold]seed[/] ...")
        claim_work_dir(self.workdir / "seed.work", fingerprint)
        if spec.build == "tiny-random":
            from moekit.tiny import build_tiny_model

            if out.exists():
                import shutil

                shutil.rmtree(out)
            build_tiny_model(out, "llama")
        else:
            from moekit.steps.seed import build_pretrained_seed

            assert spec.pretrain is not None
            build_pretrained_seed(out, pretrain_data, spec.pretrain, spec.size, val_fraction=self.recipe.val_fraction, show_progress=self.show_progress)
        marker.write_text(json.dumps({"fingerprint": fingerprint, "build": spec.build}))
        self.outcome.stages["seed"] = "ran"

    def stage_branch(self) -> None:
        from moekit.steps.branch import branch

        domains = list(self.recipe.domains)
        fingerprint = _hash(self.fingerprints["seed"], domains)

        def work() -> None:
            if (self.run_dir / MANIFEST_NAME).is_file():
                stages = [s.stage for s in load_manifest(self.run_dir).stages]
                if "run:branch" not in stages:
                    raise MoekitError(f"{self.run_dir} holds a run that this recipe did not make.", "Use another workdir.")
                import shutil

                shutil.rmtree(self.run_dir)  # made by this recipe from another seed or domains: all of it is stale
            branch(str(self.seed_dir()), self.run_dir, domains)
            with updating_manifest(self.run_dir) as manifest:  # eval and tune find the data there, even without train
                for domain in domains:
                    manifest.branches[domain].data = [absolute_spec(s) for s in self.data[domain]]
                    manifest.branches[domain].val_data = [absolute_spec(s) for s in self.val_data.get(domain, [])]

        self._stage("branch", self.run_dir / MANIFEST_NAME, fingerprint, work)

    def stage_train(self) -> None:
        from moekit.steps.branch import relink_branch
        from moekit.steps.train import train

        if self.recipe.train is None:
            self.fingerprints["train"] = self.fingerprints["branch"]  # branches stay copies of the seed
            return
        for domain in self.recipe.domains:
            data = {domain: self.data[domain]}
            fingerprint = _hash(self.fingerprints["branch"], self._data_print(data), self._train_options(), self.recipe.val_fraction)
            cfg = TrainConfig(run_dir=self.run_dir, branches=[domain], data=data, val_data={k: v for k, v in self.val_data.items() if k == domain},
                              val_fraction=self.recipe.val_fraction, text_field=self.recipe.text_field, resume=True,
                              train=self.recipe.train.train, loop=self.recipe.train.loop())

            def work(cfg: TrainConfig = cfg, domain: str = domain, fingerprint: str = fingerprint) -> None:
                trained_before = any(s.stage == "train" and s.params.get("branch") == domain for s in load_manifest(self.run_dir).stages)
                if claim_work_dir(self.run_dir / "train" / domain, fingerprint) or trained_before:
                    relink_branch(self.run_dir, domain)  # new inputs: start again from the seed, not from the old branch
                train(cfg, self.show_progress)

            self._stage(f"train:{domain}", self.run_dir / "branches" / domain, fingerprint, work)
        self.fingerprints["train"] = _hash(*(self.fingerprints[f"train:{d}"] for d in self.recipe.domains))

    def _train_options(self) -> dict[str, Any]:
        """The train section as fingerprinted (``train: all``, the default, left out so older runs keep their fingerprints)."""
        assert self.recipe.train is not None
        return self.recipe.train.model_dump(mode="json", exclude={"train"} if self.recipe.train.train == "all" else set())

    def stage_mix(self) -> None:
        from moekit.steps.mix import mix

        options = self.recipe.mix.model_dump(mode="json", exclude={"upcycle_experts", "drop_fraction"})
        upcycle = self.recipe.mix.upcycle_experts
        fingerprint = _hash(self.fingerprints.get("train") if not upcycle else self.fingerprints["seed"], self.recipe.mix.model_dump(mode="json"))
        if upcycle:  # the baseline: copies of the seed FFN, no branches
            options.update(average="uniform", weights=None, router="random", seed_as="routed")
            cfg = MixConfig(out=self.run_dir / "mixed", seed=str(self.seed_dir()), run_dir=self.run_dir, force=True,
                            upcycle={"num_experts": upcycle, "drop_fraction": self.recipe.mix.drop_fraction},
                            **{k: v for k, v in options.items() if k not in ("average", "weights", "router_sharpness", "router_tokens")})
        else:
            router_data = {d: specs[0] for d, specs in self.data.items()} if self.recipe.mix.router == "centroid" else {}
            cfg = MixConfig(out=self.run_dir / "mixed", seed=str(self.seed_dir()), experts=[(d, self.run_dir / "branches" / d) for d in self.recipe.domains],
                            run_dir=self.run_dir, router_data=router_data, force=True, **options)
        self._stage("mix", self.run_dir / "mixed", fingerprint, lambda: None if mix(cfg, self.show_progress) else None)

    def stage_average(self) -> None:
        from moekit.steps.mix.average import average_models

        branches = [self.run_dir / "branches" / d for d in self.recipe.domains]
        self._stage("average", self.run_dir / "averaged", _hash(self.fingerprints["train"]),
                    lambda: None if average_models(branches, self.run_dir / "averaged", force=True) else None)

    def stage_tune(self) -> None:
        from moekit.steps.tune import tune

        spec = self.recipe.tune
        if spec is None:
            return
        fingerprint = _hash(self.fingerprints["mix"], spec.model_dump(mode="json"), self._data_print(self.data))
        cfg = TuneConfig(model=self.run_dir / "mixed", out=self.run_dir / "tuned", run_dir=self.run_dir, data=self.data, val_data=self.val_data,
                         mixture=spec.mixture, train=spec.train, balance=spec.balance, aux_coef=spec.aux_coef, z_coef=spec.z_coef,
                         balance_scope=spec.balance_scope, routing=spec.routing, capacity_factor=spec.capacity_factor,
                         bias_rate=spec.bias_rate, bias_rule=spec.bias_rule, temperature=spec.temperature, val_fraction=self.recipe.val_fraction,
                         text_field=self.recipe.text_field, resume=True, force=True, loop=spec.loop)
        def work() -> None:
            claim_work_dir(self.run_dir / "tune", fingerprint)
            tune(cfg, self.show_progress)

        self._stage("tune", self.run_dir / "tuned", fingerprint, work)

    def _baseline_missing(self, stage: str) -> bool:
        """Log and return True when the recipe has no BTX budget for ``stage`` to match (no train or no tune)."""
        missing = [name for name in ("train", "tune") if getattr(self.recipe, name) is None or name not in self.recipe.stages]
        if stage == "upcycle" and self.recipe.mix.upcycle_experts:
            missing = ["branches (this recipe's mix is already upcycling)"]
        if missing and stage in self.recipe.stages:
            self.log(f"[dim]{stage}: skipped: the equal-compute baseline needs {' and '.join(missing)}[/]")
            self.outcome.stages[stage] = "skipped (nothing to match)"
        return bool(missing)

    def stage_dense(self) -> None:
        """The data-matched dense baseline: the seed trained on all domains for the branches' + tune's tokens."""
        from moekit.steps.baselines import DENSE_DIR, train_dense_baseline

        if self._baseline_missing("dense"):
            return
        assert self.recipe.train is not None
        fingerprint = _hash(self.fingerprints.get("train"), self.fingerprints.get("tune"), self.recipe.train.loop().model_dump(mode="json"))

        def work() -> None:
            claim_work_dir(self.run_dir / "baseline-dense", fingerprint)
            train_dense_baseline(self.run_dir, self.recipe.train.loop(), self.recipe.text_field, self.show_progress)  # type: ignore[union-attr]

        self._stage("dense", self.run_dir / DENSE_DIR, fingerprint, work)

    def stage_upcycle(self) -> None:
        """Sparse upcycling with BTX's experts and top-k, tuned for the FLOPs of the branches + tune."""
        import shutil

        from moekit.steps.baselines import UPCYCLE_STAGE, UPCYCLED_DIR, upcycle_budget_tokens, with_token_budget
        from moekit.steps.mix import mix
        from moekit.steps.tune import tune

        if self._baseline_missing("upcycle"):
            return
        spec, options = self.recipe.tune, self.recipe.mix
        assert spec is not None
        experts = len(self.recipe.domains) + int(options.seed_as == "routed")
        fingerprint = _hash(self.fingerprints.get("tune"), self.fingerprints.get("train"), options.model_dump(mode="json"), spec.model_dump(mode="json"))
        init = self.run_dir / ".upcycle-init"

        def work() -> None:
            if claim_work_dir(self.run_dir / UPCYCLE_STAGE.replace(":", "-"), fingerprint):
                shutil.rmtree(init, ignore_errors=True)  # made with other options: start again from the seed
            if not (init / "config.json").is_file():
                mix(MixConfig(out=init, seed=str(self.seed_dir()), upcycle={"num_experts": experts}, top_k=options.top_k,
                              target=options.target, dtype=options.dtype, random_seed=options.random_seed, force=True), self.show_progress)
            tokens = upcycle_budget_tokens(init, self.run_dir, spec.loop.seq_len)
            cfg = TuneConfig(model=init, out=self.run_dir / UPCYCLED_DIR, run_dir=self.run_dir, data=self.data, val_data=self.val_data,
                             mixture=spec.mixture, train="all", balance=spec.balance, aux_coef=spec.aux_coef, z_coef=spec.z_coef,
                             balance_scope=spec.balance_scope, bias_rate=spec.bias_rate, bias_rule=spec.bias_rule,
                             text_field=self.recipe.text_field, resume=True, force=True, stage=UPCYCLE_STAGE,
                             loop=with_token_budget(spec.loop, tokens))
            tune(cfg, self.show_progress)
            shutil.rmtree(init, ignore_errors=True)

        self._stage("upcycle", self.run_dir / UPCYCLED_DIR, fingerprint, work)

    def _eval_seq_len(self) -> int:
        return self.recipe.eval.seq_len or (self.recipe.train.seq_len if self.recipe.train else 512)

    def stage_eval(self) -> None:
        from moekit.steps.evaluate import evaluate_models

        upstream = [self.fingerprints.get(s, "") for s in ("branch", "train", "mix", "average", "tune", "dense", "upcycle")]
        fingerprint = _hash(*upstream, self.recipe.eval.model_dump(mode="json"))
        out = self.run_dir / "eval.json"

        def work() -> None:
            cfg = EvalConfig(models=[str(self.run_dir)], seq_len=self._eval_seq_len(), batch_size=self.recipe.eval.batch_size,
                             max_tokens=self.recipe.eval.max_tokens, text_field=self.recipe.text_field)
            out.write_text(json.dumps(evaluate_models(cfg, self.show_progress), indent=1))

        self._stage("eval", out, fingerprint, work)
        self.outcome.eval_report = json.loads(out.read_text()) if out.is_file() else None

    def stage_inspect(self) -> None:
        from moekit.steps.inspect import inspect_model

        model = self.run_dir / ("tuned" if (self.run_dir / "tuned" / "config.json").is_file() else "mixed")
        fingerprint = _hash(self.fingerprints.get("tune", ""), self.fingerprints.get("mix", ""), self.recipe.eval.model_dump(mode="json"))
        out = self.run_dir / "inspect"
        data = {d: (self.val_data.get(d) or specs)[:1] for d, specs in self.data.items()}

        def work() -> None:
            cfg = InspectConfig(model=str(model), data=data, seq_len=self._eval_seq_len(), batch_size=self.recipe.eval.batch_size,
                                max_tokens=min(self.recipe.eval.max_tokens, 16384), text_field=self.recipe.text_field,
                                json_path=out / "routing.json", plot_dir=out)
            inspect_model(cfg, self.show_progress)

        self._stage("inspect", out / "routing.json", fingerprint, work)
        routing = out / "routing.json"
        self.outcome.routing = json.loads(routing.read_text()) if routing.is_file() else None


WORKDIR_MARKER = "recipe.yaml"  # every recipe work directory has it at its root


def check_workdir(workdir: Path) -> None:
    """Refuse a recipe ``workdir`` that is a file or lies under one, or whose location cannot be written."""
    from moekit.io.atomic import check_writable_parent

    for path in [workdir, *workdir.parents]:
        if path.exists() and not path.is_dir():
            raise MoekitError(f"The recipe's workdir {workdir} cannot be created: {path} is a file.", "Set workdir to a directory path (workdir=DIR).")
    if not workdir.is_dir():
        check_writable_parent(workdir)
    elif not os.access(workdir, os.W_OK | os.X_OK):
        raise MoekitError(f"The recipe's workdir {workdir} is not writable.", "Choose a workdir you can write to (workdir=DIR).")


def clear_workdir(workdir: Path) -> None:
    """Delete a recipe work directory (``demo --force``); refuse one that is not a recipe's."""
    import shutil

    if not workdir.exists():
        return
    if not workdir.is_dir() or (any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).is_file()):
        raise MoekitError(
            f"{workdir} is not a moekit work directory (no {WORKDIR_MARKER}); --force would delete it and everything in it.",
            "Choose a new --out directory, or one an earlier demo or run wrote.",
        )
    shutil.rmtree(workdir)


def run_recipe(recipe: Recipe, show_progress: bool = True, log: Callable[[str], None] = lambda message: None) -> RunOutcome:
    """Run every stage of ``recipe`` in order (skipping finished ones); return what happened."""
    check_workdir(recipe.workdir)
    runner = RecipeRun(recipe, show_progress, log)
    runner.workdir.mkdir(parents=True, exist_ok=True)
    (runner.workdir / WORKDIR_MARKER).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    for stage in (runner.stage_seed, runner.stage_branch, runner.stage_train, runner.stage_mix, runner.stage_average,
                  runner.stage_tune, runner.stage_dense, runner.stage_upcycle, runner.stage_eval, runner.stage_inspect):
        stage()
    return runner.outcome
