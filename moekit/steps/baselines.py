"""The baselines BTX is judged against (BTX paper, section 4), given the same compute as BTX.

- ``dense``: the seed trained further on the union of the domains, for as many tokens as all the
  branches and the tune together (the paper's data-matched dense model). Written to RUN_DIR/dense.
- ``upcycle``: sparse upcycling (Komatsuzaki et al. 2023): an MoE with BTX's expert count and
  top-k whose experts all start as the seed's FFN, trained on the domain mixture for as many
  model FLOPs as the branches and the tune together (``moekit.train.compute``). Written to RUN_DIR/upcycled.

Both read each domain's recorded held-out split, so they are never trained on an eval token, and
record their tokens and FLOPs in the run manifest (``baseline:dense``, ``baseline:upcycle``) beside
those of ``train`` and ``tune``: ``eval RUN_DIR`` prints them as the compute of each row.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.domains import heldout_sets, training_mixture
from moekit.errors import MoekitError
from moekit.manifest import (
    DENSE_DIR,
    DENSE_STAGE,
    UPCYCLE_STAGE,
    UPCYCLED_DIR,
    RunManifest,
    StageRecord,
    load_manifest,
    updating_manifest,
)
from moekit.train.compute import model_compute, training_flops


@dataclass(frozen=True)
class Compute:
    """Training tokens and model FLOPs."""

    tokens: int = 0
    flops: float = 0.0

    def __add__(self, other: Compute) -> Compute:
        return Compute(self.tokens + other.tokens, self.flops + other.flops)

    def as_dict(self) -> dict[str, float]:
        """JSON form."""
        return {"tokens": self.tokens, "flops": self.flops}


def _last(manifest: RunManifest, stage: str, branch: str | None = None) -> StageRecord | None:
    records = [s for s in manifest.stages if s.stage == stage and (branch is None or s.params.get("branch") == branch)]
    return records[-1] if records else None


def _record_compute(record: StageRecord | None, model_dir: Path, seq_len_key: str = "seq_len") -> Compute:
    """A stage record's tokens and FLOPs (FLOPs computed from the model for records written before they were kept)."""
    if record is None or "tokens" not in record.outputs:
        return Compute()
    tokens = int(record.outputs["tokens"])
    flops = record.outputs.get("flops")
    if flops is None:
        params = record.params.get("loop", record.params)
        flops = (
            training_flops(model_dir, tokens, int(params.get(seq_len_key, 1024)))
            if (Path(model_dir) / "config.json").is_file()
            else 0.0
        )
    return Compute(tokens, float(flops))


def run_compute(run_dir: Path) -> dict[str, Compute]:
    """Training compute spent on each model of a run directory, beyond the seed's own pretraining.

    Keys are eval's row labels: ``branch NAME``, ``averaged`` and ``mixed`` (the branches'),
    ``tuned`` (branches + tune), ``dense`` and ``upcycled`` (their own).
    """
    manifest = load_manifest(run_dir)
    seed = Path(manifest.seed.path)
    result = {"seed": Compute()}
    branches = Compute()
    mix = _last(manifest, "mix")
    mixed = set(mix.outputs.get("experts") or []) if mix is not None else set(manifest.branches)
    for name in manifest.branches:
        spent = _record_compute(_last(manifest, "train", name), seed)
        result[f"branch {name}"] = spent
        if name in mixed or not mixed & set(manifest.branches):  # a branch added later is not in the mixed model
            branches = branches + spent
    result["averaged"] = result["mixed"] = branches
    tune = _last(manifest, "tune")
    result["tuned"] = branches + _record_compute(tune, run_dir / "mixed")
    for record in manifest.stages:  # mix --add-expert: the MoE grown from plus the new branch; then its own tune
        if record.stage == "add-expert":
            grown = Path(str(record.outputs["out"])).name
            into = Path(str(record.params.get("into", ""))).name
            added = result.get(f"branch {record.params.get('name')}", Compute())
            result[grown] = result.get(into, Compute()) + added
            result[f"{grown}-tuned"] = result[grown] + _record_compute(
                _last(manifest, f"tune:{grown}"), run_dir / grown
            )
    result[DENSE_DIR] = _record_compute(_last(manifest, DENSE_STAGE), seed)
    result[UPCYCLED_DIR] = _record_compute(_last(manifest, UPCYCLE_STAGE), run_dir / UPCYCLED_DIR)
    return result


def btx_budget(run_dir: Path) -> Compute:
    """What BTX spent: every branch's training and the tune (the budget both baselines get)."""
    spent = run_compute(run_dir)["tuned"]
    if not spent.tokens:
        raise MoekitError(
            f"{run_dir} records no branch training or tune: there is no BTX budget to match.",
            "Run the train and tune stages first.",
        )
    return spent


def matched_tokens(model_dir: Path, budget: Compute, seq_len: int) -> int:
    """Training tokens of ``model_dir`` at ``seq_len`` that cost ``budget.flops`` model FLOPs."""
    return max(1, round(budget.flops / model_compute(model_dir).training_flops_per_token(seq_len)))


def with_token_budget(loop: LoopSettings, tokens: int) -> LoopSettings:
    """``loop`` with its budget replaced by ``tokens`` (rounded up to whole steps by the loop)."""
    return LoopSettings.model_validate({**loop.model_dump(), "max_steps": None, "max_tokens": tokens})


def train_dense_baseline(
    run_dir: Path, loop: LoopSettings, text_field: str = "text", show_progress: bool = True
) -> Path:
    """Train the seed on an equal mixture of every branch's data for BTX's token budget; write RUN_DIR/dense.

    ``loop`` gives the optimiser settings (the recipe uses the branches'); its budget is replaced.
    Resumes from its checkpoints (RUN_DIR/baseline-dense) when interrupted.
    """
    from moekit.io.loading import load_causal_lm
    from moekit.train.loop import LoopJob, make_loop_engine, run_loop
    from moekit.train.saving import resolve_save_dtype

    manifest = load_manifest(run_dir)
    budget = btx_budget(run_dir)
    settings = with_token_budget(loop, budget.tokens)
    seed = Path(manifest.seed.path)
    work_dir = run_dir / DENSE_STAGE.replace(":", "-")
    engine = make_loop_engine(settings)
    try:
        with engine.main_process_first():  # the recorded splits: never a new one
            domains = _branch_domains(run_dir, manifest, settings.seq_len, text_field)
        torch.manual_seed(settings.seed)
        model = load_causal_lm(seed, torch.float32)
        dtype = resolve_save_dtype(settings.save_dtype, seed)
        pool, eval_sets = training_mixture(domains, None, settings.seed), heldout_sets(domains, settings.eval_blocks)
        job = LoopJob(
            model,
            pool,
            eval_sets,
            settings,
            work_dir,
            True,
            "dense baseline",
            show_progress,
            save_dtype=dtype,
            fingerprint_extra={"baseline": "dense"},
        )
        result = run_loop(job, engine)
        if engine.is_main_process:
            _save_dense(run_dir, seed, model, result, dtype, settings, budget, list(domains))
        engine.wait_for_everyone()
    finally:
        engine.close()
    return run_dir / DENSE_DIR


def _branch_domains(run_dir: Path, manifest: RunManifest, seq_len: int, text_field: str) -> dict[str, Any]:
    """Every branch's training and held-out blocks, on the splits the run recorded."""
    from moekit.data.domains import domains_data
    from moekit.models import load_tokenizer

    data = {name: record.data for name, record in manifest.branches.items() if record.data}
    val_data = {name: record.val_data for name, record in manifest.branches.items() if record.val_data}
    tokenizer = load_tokenizer(manifest.seed.path)
    return domains_data(tokenizer, data, val_data, seq_len, None, text_field, run_dir / ".cache" / "tokens", manifest)


def _save_dense(
    run_dir: Path,
    seed: Path,
    model: Any,
    result: Any,
    dtype: torch.dtype,
    settings: LoopSettings,
    budget: Compute,
    domains: list[str],
) -> None:
    """Write RUN_DIR/dense with its model card, drop the checkpoints, record the stage with its compute."""
    from moekit.train.saving import write_trained_model

    assert result.state_dict is not None
    work_dir = run_dir / DENSE_STAGE.replace(":", "-")
    card = _card(
        f"the seed trained on an equal mixture of {', '.join(domains)} for {result.tokens:,} tokens "
        f"(BTX's branches + tune: {budget.tokens:,})"
    )
    write_trained_model(
        run_dir / DENSE_DIR,
        seed,
        model,
        result.state_dict,
        dtype,
        [work_dir / "metrics.jsonl"],
        force=True,
        add_files=card,
    )
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    spent = Compute(result.tokens, training_flops(seed, result.tokens, settings.seq_len))
    params = {"matched": "tokens", "budget": budget.as_dict(), "loop": settings.model_dump(mode="json")}
    _record(run_dir, DENSE_STAGE, params, {**spent.as_dict(), "eval_loss": result.eval})


def _card(what: str) -> Any:
    def add(tmp: Path) -> None:
        (tmp / "README.md").write_text(
            f"# Dense baseline\n\nA moekit BTX baseline: {what}. Compare it with the run's tuned MoE "
            "(`moekit eval RUN_DIR`).\n"
        )

    return add


def _record(run_dir: Path, stage: str, params: dict[str, Any], outputs: dict[str, Any]) -> None:
    with updating_manifest(run_dir) as manifest:
        manifest.stages.append(StageRecord(stage=stage, params=params, outputs=outputs))


def upcycle_budget_tokens(init_dir: Path, run_dir: Path, seq_len: int) -> int:
    """Tokens the upcycled MoE at ``init_dir`` trains on to spend BTX's FLOPs (whole steps round up: at most one step
    over)."""
    return matched_tokens(init_dir, btx_budget(run_dir), seq_len)
