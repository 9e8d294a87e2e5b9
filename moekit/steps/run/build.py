"""The stages that build the models: seed, branch, train, mix, average, tune."""

from __future__ import annotations

import json
from typing import Any

from moekit.config import MixConfig, TrainConfig, TuneConfig
from moekit.data import absolute_spec
from moekit.errors import MoekitError
from moekit.io.locks import idle_run
from moekit.manifest import MANIFEST_NAME, load_manifest, updating_manifest
from moekit.steps.run.base import RunBase, claim_work_dir, stage_hash


class BuildStages(RunBase):
    """seed -> branch -> train -> mix (and the weight average) -> tune."""

    def stage_seed(self) -> None:
        spec = self.recipe.seed
        if spec.build is None:
            self.fingerprints["seed"] = stage_hash(str(self.seed_dir()))
            return
        out = self.workdir / "seed"
        pretrain_data = {"pretrain": [self._local(s) for s in spec.pretrain_data]} if spec.pretrain_data else self.data
        fingerprint = stage_hash(
            spec.model_dump(mode="json"), self._data_print(pretrain_data) if spec.build == "pretrained-small" else ""
        )
        marker = out / "moekit-seed.json"

        def done() -> bool:  # the seed lies outside the run directory: its marker, not the manifest, records it
            return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint

        def work() -> None:
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
                build_pretrained_seed(
                    out,
                    pretrain_data,
                    spec.pretrain,
                    spec.size,
                    val_fraction=self.recipe.val_fraction,
                    show_progress=self.show_progress,
                )
            marker.write_text(json.dumps({"fingerprint": fingerprint, "build": spec.build}))

        self._stage("seed", out, fingerprint, work, done=done)

    def stage_branch(self) -> None:
        domains = list(self.recipe.domains)
        fingerprint = stage_hash(self.fingerprints["seed"], domains)

        def work() -> None:
            from moekit.steps.branch import branch

            if (self.run_dir / MANIFEST_NAME).is_file():
                stages = [s.stage for s in load_manifest(self.run_dir).stages]
                if "run:branch" not in stages:
                    raise MoekitError(
                        f"{self.run_dir} holds a run that this recipe did not make.", "Use another workdir."
                    )
                import shutil

                with idle_run(self.run_dir):  # made by this recipe from another seed or domains: all of it is stale
                    shutil.rmtree(self.run_dir)
            branch(str(self.seed_dir()), self.run_dir, domains)
            with updating_manifest(self.run_dir) as manifest:  # eval and tune find the data there, even without train
                for domain in domains:
                    manifest.branches[domain].data = [absolute_spec(s) for s in self.data[domain]]
                    manifest.branches[domain].val_data = [absolute_spec(s) for s in self.val_data.get(domain, [])]

        self._stage("branch", self.run_dir / MANIFEST_NAME, fingerprint, work)

    def stage_train(self) -> None:
        if self.recipe.train is None:
            self.fingerprints["train"] = self.fingerprints["branch"]  # branches stay copies of the seed
            return
        for domain in self.recipe.domains:
            data = {domain: self.data[domain]}
            fingerprint = stage_hash(
                self.fingerprints["branch"], self._data_print(data), self._train_options(), self.recipe.val_fraction
            )
            cfg = TrainConfig(
                run_dir=self.run_dir,
                branches=[domain],
                data=data,
                val_data={k: v for k, v in self.val_data.items() if k == domain},
                val_fraction=self.recipe.val_fraction,
                text_field=self.recipe.text_field,
                resume=True,
                train=self.recipe.train.train,
                loop=self.recipe.train.loop(),
            )

            def work(cfg: TrainConfig = cfg, domain: str = domain, fingerprint: str = fingerprint) -> None:
                from moekit.steps.branch import relink_branch
                from moekit.steps.train import train

                def prepare() -> None:
                    trained_before = any(
                        s.stage == "train" and s.params.get("branch") == domain
                        for s in load_manifest(self.run_dir).stages
                    )
                    if claim_work_dir(self.run_dir / "train" / domain, fingerprint) or trained_before:
                        relink_branch(self.run_dir, domain)  # new inputs: start again from the seed, not the old one

                self._main_first(prepare)
                train(cfg, self.show_progress)

            self._stage(f"train:{domain}", self.run_dir / "branches" / domain, fingerprint, work)
        self.fingerprints["train"] = stage_hash(*(self.fingerprints[f"train:{d}"] for d in self.recipe.domains))

    def _train_options(self) -> dict[str, Any]:
        """The train section as fingerprinted (``train: all``, the default, left out so older runs keep their
        fingerprints)."""
        assert self.recipe.train is not None
        return self.recipe.train.model_dump(
            mode="json", exclude={"train"} if self.recipe.train.train == "all" else set()
        )

    def stage_mix(self) -> None:
        options = self.recipe.mix.model_dump(mode="json", exclude={"upcycle_experts", "drop_fraction"})
        upcycle = self.recipe.mix.upcycle_experts
        fingerprint = stage_hash(
            self.fingerprints.get("train") if not upcycle else self.fingerprints["seed"], self.recipe.mix.fingerprint()
        )
        if upcycle:  # the baseline: copies of the seed FFN, no branches
            options.update(average="uniform", weights=None, router="random", seed_as="routed")
            cfg = MixConfig(
                out=self.run_dir / "mixed",
                seed=str(self.seed_dir()),
                run_dir=self.run_dir,
                force=True,
                upcycle={"num_experts": upcycle, "drop_fraction": self.recipe.mix.drop_fraction},
                **{
                    k: v
                    for k, v in options.items()
                    if k not in ("average", "weights", "router_sharpness", "router_tokens")
                    and not k.startswith("attention_")
                },
            )
        else:
            router_data = (
                {d: specs[0] for d, specs in self.data.items()} if self.recipe.mix.router == "centroid" else {}
            )
            cfg = MixConfig(
                out=self.run_dir / "mixed",
                seed=str(self.seed_dir()),
                experts=[(d, self.run_dir / "branches" / d) for d in self.recipe.domains],
                run_dir=self.run_dir,
                router_data=router_data,
                force=True,
                **options,
            )

        def work() -> None:
            from moekit.steps.mix import mix

            mix(cfg, self.show_progress)

        self._stage("mix", self.run_dir / "mixed", fingerprint, work)

    def stage_average(self) -> None:
        def work() -> None:
            from moekit.steps.mix.average import average_models

            branches = [self.run_dir / "branches" / d for d in self.recipe.domains]
            average_models(branches, self.run_dir / "averaged", force=True)

        self._stage("average", self.run_dir / "averaged", stage_hash(self.fingerprints["train"]), work)

    def stage_tune(self) -> None:
        spec = self.recipe.tune
        if spec is None:
            return
        fingerprint = stage_hash(self.fingerprints["mix"], spec.fingerprint(), self._data_print(self.data))
        cfg = TuneConfig(
            model=self.run_dir / "mixed",
            out=self.run_dir / "tuned",
            run_dir=self.run_dir,
            data=self.data,
            val_data=self.val_data,
            mixture=spec.mixture,
            **{key: getattr(spec, key) for key in ("train", "balance", "aux_coef") if key in spec.model_fields_set},
            hypermoe=spec.hypermoe,
            z_coef=spec.z_coef,
            balance_scope=spec.balance_scope,
            routing=spec.routing,
            router_jitter=spec.router_jitter,
            capacity_factor=spec.capacity_factor,
            bias_rate=spec.bias_rate,
            bias_rule=spec.bias_rule,
            temperature=spec.temperature,
            val_fraction=self.recipe.val_fraction,
            text_field=self.recipe.text_field,
            resume=True,
            force=True,
            loop=spec.loop,
        )

        def work() -> None:
            from moekit.steps.tune import tune

            self._main_first(lambda: None if claim_work_dir(self.run_dir / "tune", fingerprint) else None)
            tune(cfg, self.show_progress)

        self._stage("tune", self.run_dir / "tuned", fingerprint, work)
