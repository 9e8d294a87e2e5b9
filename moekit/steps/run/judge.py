"""The stages that judge the models: the equal-compute baselines, eval and inspect."""

from __future__ import annotations

import json

from moekit.config import EvalConfig, InspectConfig, MixConfig, TuneConfig
from moekit.io.outputs import write_file
from moekit.manifest import DENSE_DIR, UPCYCLE_STAGE, UPCYCLED_DIR
from moekit.steps.run.base import RunBase, claim_work_dir, main_process, stage_hash


class JudgeStages(RunBase):
    """The dense and upcycling baselines at equal compute, then eval of every model and inspect of the MoE."""

    def _baseline_missing(self, stage: str) -> bool:
        """Log and return True when the recipe has no BTX budget for ``stage`` to match (no train or no tune)."""
        missing = [
            name for name in ("train", "tune") if getattr(self.recipe, name) is None or name not in self.recipe.stages
        ]
        if stage == "upcycle" and self.recipe.mix.upcycle_experts:
            missing = ["branches (this recipe's mix is already upcycling)"]
        if missing and stage in self.recipe.stages:
            self.log(f"[dim]{stage}: skipped: the equal-compute baseline needs {' and '.join(missing)}[/]")
            self.outcome.stages[stage] = "skipped (nothing to match)"
        return bool(missing)

    def stage_dense(self) -> None:
        """The data-matched dense baseline: the seed trained on all domains for the branches' + tune's tokens."""
        if self._baseline_missing("dense"):
            return
        assert self.recipe.train is not None
        fingerprint = stage_hash(
            self.fingerprints.get("train"),
            self.fingerprints.get("tune"),
            self.recipe.train.loop().model_dump(mode="json"),
        )

        def work() -> None:
            from moekit.steps.baselines import train_dense_baseline

            self._main_first(lambda: None if claim_work_dir(self.run_dir / "baseline-dense", fingerprint) else None)
            train_dense_baseline(self.run_dir, self.recipe.train.loop(), self.recipe.text_field, self.show_progress)  # type: ignore[union-attr]

        self._stage("dense", self.run_dir / DENSE_DIR, fingerprint, work)

    def stage_upcycle(self) -> None:
        """Sparse upcycling with BTX's experts and top-k, tuned for the FLOPs of the branches + tune."""
        import shutil

        if self._baseline_missing("upcycle"):
            return
        spec, options = self.recipe.tune, self.recipe.mix
        assert spec is not None
        experts = len(self.recipe.domains) + int(options.seed_as == "routed")
        fingerprint = stage_hash(
            self.fingerprints.get("tune"),
            self.fingerprints.get("train"),
            options.fingerprint(),
            spec.fingerprint(),
        )
        init = self.run_dir / ".upcycle-init"

        def prepare() -> None:
            from moekit.steps.mix import mix

            if claim_work_dir(self.run_dir / UPCYCLE_STAGE.replace(":", "-"), fingerprint):
                shutil.rmtree(init, ignore_errors=True)  # made with other options: start again from the seed
            if not (init / "config.json").is_file():
                kept = options.model_dump(include={"top_k", "target", "dtype", "random_seed"})
                mix(
                    MixConfig(
                        out=init, seed=str(self.seed_dir()), upcycle={"num_experts": experts}, force=True, **kept
                    ),
                    self.show_progress,
                )

        def work() -> None:
            from moekit.steps.baselines import upcycle_budget_tokens, with_token_budget
            from moekit.steps.tune import tune

            self._main_first(prepare)
            tokens = upcycle_budget_tokens(init, self.run_dir, spec.loop.seq_len)
            balancing = spec.model_dump(
                include={"mixture", "balance", "aux_coef", "z_coef", "balance_scope", "bias_rate", "bias_rule"}
            )
            cfg = TuneConfig(
                model=init,
                out=self.run_dir / UPCYCLED_DIR,
                run_dir=self.run_dir,
                data=self.data,
                val_data=self.val_data,
                train="all",
                text_field=self.recipe.text_field,
                resume=True,
                force=True,
                stage=UPCYCLE_STAGE,
                loop=with_token_budget(spec.loop, tokens),
                **balancing,
            )
            tune(cfg, self.show_progress)
            if main_process():
                shutil.rmtree(init, ignore_errors=True)

        self._stage("upcycle", self.run_dir / UPCYCLED_DIR, fingerprint, work)

    def _eval_seq_len(self) -> int:
        return self.recipe.eval.seq_len or (self.recipe.train.seq_len if self.recipe.train else 512)

    def stage_eval(self) -> None:
        upstream = [
            self.fingerprints.get(s, "") for s in ("branch", "train", "mix", "average", "tune", "dense", "upcycle")
        ]
        fingerprint = stage_hash(*upstream, self.recipe.eval.model_dump(mode="json"))
        out = self.run_dir / "eval.json"

        def work() -> None:
            from moekit.steps.evaluate import evaluate_models

            cfg = EvalConfig(
                models=[str(self.run_dir)],
                seq_len=self._eval_seq_len(),
                batch_size=self.recipe.eval.batch_size,
                max_tokens=self.recipe.eval.max_tokens,
                text_field=self.recipe.text_field,
            )
            write_file(out, json.dumps(evaluate_models(cfg, self.show_progress), indent=1), "eval report", force=True)

        self._stage("eval", out, fingerprint, work)
        self.outcome.eval_report = json.loads(out.read_text()) if out.is_file() else None

    def stage_inspect(self) -> None:
        model = self.run_dir / ("tuned" if (self.run_dir / "tuned" / "config.json").is_file() else "mixed")
        fingerprint = stage_hash(
            self.fingerprints.get("tune", ""),
            self.fingerprints.get("mix", ""),
            self.recipe.eval.model_dump(mode="json"),
        )
        out = self.run_dir / "inspect"
        data = {d: (self.val_data.get(d) or specs)[:1] for d, specs in self.data.items()}

        def work() -> None:
            from moekit.steps.inspect import inspect_model

            cfg = InspectConfig(
                model=str(model),
                data=data,
                seq_len=self._eval_seq_len(),
                batch_size=self.recipe.eval.batch_size,
                max_tokens=min(self.recipe.eval.max_tokens, 16384),
                text_field=self.recipe.text_field,
                json_path=out / "routing.json",
                plot_dir=out,
                force=True,  # the run's own record
            )
            inspect_model(cfg, self.show_progress)

        self._stage("inspect", out / "routing.json", fingerprint, work)
        routing = out / "routing.json"
        self.outcome.routing = json.loads(routing.read_text()) if routing.is_file() else None
