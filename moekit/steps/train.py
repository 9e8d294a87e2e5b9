"""``moekit train``: continued pretraining of each branch on its own domain (BTX's "branch & train").

Each branch is trained independently, so branches can run as separate jobs on separate
machines. Data specs are remembered in the run manifest. Every branch with data contributes a
held-out split that is evaluated periodically, so forgetting of other domains shows in the
metrics. The trained branch is written through an atomic directory swap: files shared with the
seed by hard links are never written into.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.arch import get_adapter
from moekit.arch.base import LAYER_TENSOR
from moekit.config import TrainConfig
from moekit.data.domains import DomainData, domains_data, heldout_sets, record_heldout
from moekit.data.sources import absolute_spec
from moekit.errors import DataError, InvalidOptionError
from moekit.io.config_json import dtype_name
from moekit.io.loading import load_causal_lm
from moekit.io.locks import exclusive
from moekit.manifest import RunManifest, StageRecord, load_manifest, updating_manifest
from moekit.models import check_model_dir, fit_context_length
from moekit.train.compute import training_flops
from moekit.train.engine import Engine
from moekit.train.loop import LoopJob, is_main_process, make_loop_engine, run_loop
from moekit.train.saving import resolve_save_dtype, write_trained_model


@dataclass
class BranchTrainResult:
    """What training one branch did."""

    branch: str
    path: Path
    steps: int
    tokens: int
    resumed_from: int
    final_loss: float
    eval: dict[str, float]
    saved_dtype: str = ""
    unchanged_share: float | None = None  # share of weights bit-identical to the branch's input after saving


def branch_trainable(model_type: str, what: str) -> Callable[[str], bool]:
    """Which parameters of a dense branch learn, by name, for ``train --train``.

    ``ffn``: only the FFN tensors (the family adapter says which they are); attention, norms and
    embeddings stay the seed's bit for bit, so ``mix`` averages nothing that diverged and each
    branch is reproduced exactly when routed to its own expert (FlexOlmo's way of keeping experts
    compatible). ``ffn+norms`` also trains the layer norms outside attention.
    """
    if what == "all":
        return lambda name: True
    adapter = get_adapter(model_type)

    def chosen(name: str) -> bool:
        match = LAYER_TENSOR.match(name)
        if match and adapter.is_ffn_tensor(match.group(2)):
            return True
        module = name.split(".")[-2] if name.count(".") else ""
        return what == "ffn+norms" and "norm" in module and ".self_attn." not in name

    return chosen


def parse_branch_data(run_dir: Path, items: list[str], branches: list[str], option: str) -> dict[str, list[str]]:
    """Map repeated ``[BRANCH=]PATH`` options to branch -> specs.

    ``BRANCH=PATH`` names a branch of the run; a bare PATH belongs to the single ``--branch`` given.
    """
    known = list(load_manifest(run_dir).branches) if items else []
    result: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name in known:
            result.setdefault(name, []).append(path)
        elif len(branches) == 1:
            result.setdefault(branches[0], []).append(item)
        else:
            raise InvalidOptionError(
                f"{option} {item}: which branch is it for?",
                f"Write {option} BRANCH=PATH (branches: {', '.join(known)}), or train one --branch at a time.",
            )
    return result


def register_data(manifest: RunManifest, cfg: TrainConfig) -> None:
    """Record the given data specs in the manifest (replacing a branch's earlier ones)."""
    for option, mapping in (("--data", cfg.data), ("--val-data", cfg.val_data)):
        for branch, specs in mapping.items():
            if branch not in manifest.branches:
                raise InvalidOptionError(
                    f"{option} names branch '{branch}', which the run does not have.",
                    f"Branches: {', '.join(manifest.branches)}.",
                )
            record = manifest.branches[branch]
            absolute = [absolute_spec(s) for s in specs]
            if option == "--data":
                record.data = absolute
            else:
                record.val_data = absolute


def prepare_data(manifest: RunManifest, cfg: TrainConfig, tokenizer: Any) -> dict[str, DomainData]:
    """Training and held-out blocks of every branch that has data (token stores prepared where missing).

    Each domain's held-out split is the one recorded in the manifest, or a new one.
    """
    # The branches this job trains first: jobs that train other branches of the run at the same time prepare
    # their own domains' stores meanwhile, and each then finds the others' in the shared cache.
    order = [*cfg.branches, *(name for name in manifest.branches if name not in cfg.branches)]
    data = {name: manifest.branches[name].data for name in order if manifest.branches[name].data}
    val_data = {name: record.val_data for name, record in manifest.branches.items() if record.val_data}
    cache_dir = cfg.run_dir / ".cache" / "tokens"
    return domains_data(
        tokenizer, data, val_data, cfg.loop.seq_len, cfg.val_fraction, cfg.text_field, cache_dir, manifest
    )


def _check_known(manifest: RunManifest, cfg: TrainConfig) -> None:
    unknown = [b for b in cfg.branches if b not in manifest.branches]
    if unknown:
        raise InvalidOptionError(
            f"Unknown branch '{unknown[0]}'.", f"The run's branches are: {', '.join(manifest.branches)}."
        )
    repeated = sorted({b for b in cfg.branches if cfg.branches.count(b) > 1})
    if repeated:
        raise InvalidOptionError(f"--branch {repeated[0]} is given more than once.", "Name each branch once.")


def _finished_earlier(manifest: RunManifest, name: str, cfg: TrainConfig) -> bool:
    """Whether the newest train record of ``name`` is this very job (same data and settings).

    With --resume, such a branch was completed by the interrupted multi-branch call and is
    skipped instead of being trained a second time.
    """
    records = [s for s in manifest.stages if s.stage == "train" and s.params.get("branch") == name]
    return bool(records) and records[-1].params == _stage_params(manifest, name, cfg)


def _stage_params(manifest: RunManifest, name: str, cfg: TrainConfig) -> dict[str, Any]:
    params = {"branch": name, "data": manifest.branches[name].data, **cfg.loop.model_dump(mode="json")}
    return params if cfg.train == "all" else {**params, "train": cfg.train}  # older records (all) stay comparable


def _selected_branches(manifest: RunManifest, cfg: TrainConfig) -> list[str]:
    names = cfg.branches or list(manifest.branches)
    missing = [n for n in names if not manifest.branches[n].data]
    if missing:
        raise DataError(
            f"Branch '{missing[0]}' has no training data.",
            f"Pass --data {missing[0]}=PATH (it is remembered in moekit.yaml).",
        )
    return names


def train(cfg: TrainConfig, show_progress: bool = True) -> list[BranchTrainResult]:
    """Train the selected branches of a run in turn; return one result per branch."""
    manifest = load_manifest(cfg.run_dir)
    _check_known(manifest, cfg)
    register_data(manifest, cfg)
    names = _selected_branches(manifest, cfg)
    fit_context_length([manifest.branch_dir(cfg.run_dir, name) for name in names], cfg.loop)
    if cfg.resume:
        names = [
            n
            for n in names
            if not _finished_earlier(manifest, n, cfg) or (cfg.run_dir / "train" / n / "checkpoints").exists()
        ]
        if not names:
            return []
    for name in names:
        check_model_dir(manifest.branch_dir(cfg.run_dir, name), f"Branch '{name}' directory")
    with contextlib.ExitStack() as held:
        if is_main_process():  # one job per branch: a second train of a branch that is training is refused
            for name in names:
                held.enter_context(exclusive(cfg.run_dir / f".train-{name}.lock", f"Branch '{name}' of {cfg.run_dir}"))
        engine = make_loop_engine(cfg.loop, cfg.device)
        try:
            return _train_branches(cfg, manifest, names, engine, show_progress)
        finally:
            engine.close()


def _train_branches(
    cfg: TrainConfig, manifest: RunManifest, names: list[str], engine: Engine, show_progress: bool
) -> list[BranchTrainResult]:
    """Prepare the data (rank 0 first) and train each selected branch in turn."""
    from moekit.models import load_tokenizer

    tokenizer = load_tokenizer(manifest.branch_dir(cfg.run_dir, names[0]))
    with engine.main_process_first():  # rank 0 tokenises, the others read its stores
        domains = prepare_data(manifest, cfg, tokenizer)
    if engine.is_main_process:
        with updating_manifest(cfg.run_dir) as fresh:  # other jobs may have written since we read it
            register_data(fresh, cfg)
        record_heldout(cfg.run_dir, domains)
    eval_sets = heldout_sets(domains, cfg.loop.eval_blocks)
    results = []
    for name in names:
        results.append(_train_branch(cfg, manifest, name, domains[name].train, eval_sets, engine, show_progress))
        engine.free_memory()  # drop this branch's model and optimiser before the next
    return results


def _train_branch(
    cfg: TrainConfig,
    manifest: RunManifest,
    name: str,
    blocks: Any,
    eval_sets: dict[str, Any],
    engine: Engine,
    show_progress: bool,
) -> BranchTrainResult:
    """Train branch ``name`` on its blocks and write it back in place (rank 0), recording the stage."""
    branch_dir = manifest.branch_dir(cfg.run_dir, name)
    work_dir = cfg.run_dir / "train" / name
    torch.manual_seed(cfg.loop.seed)
    model = load_causal_lm(branch_dir, torch.float32)
    dtype = resolve_save_dtype(cfg.loop.save_dtype, branch_dir)
    job = LoopJob(
        model,
        blocks,
        eval_sets,
        cfg.loop,
        work_dir,
        cfg.resume,
        f"train {name}",
        show_progress,
        save_dtype=dtype,
        trainable=branch_trainable(model.config.model_type, cfg.train),
        fingerprint_extra={"train": cfg.train} if cfg.train != "all" else {},
    )
    result = run_loop(job, engine)
    saved = None
    if engine.is_main_process:
        assert result.state_dict is not None
        saved = write_trained_model(
            branch_dir, branch_dir, model, result.state_dict, dtype, [work_dir / "metrics.jsonl"], kind="branch"
        )
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
        outputs = {
            "steps": result.steps,
            "tokens": result.tokens,
            "flops": training_flops(branch_dir, result.tokens, cfg.loop.seq_len),
            "loss": result.last_row.get("loss"),
            "eval_loss": result.eval,
            "saved_dtype": dtype_name(dtype),
            "unchanged_share": saved.unchanged_share,
        }
        with updating_manifest(cfg.run_dir) as fresh:
            fresh.stages.append(StageRecord(stage="train", params=_stage_params(manifest, name, cfg), outputs=outputs))
            fresh.branches[name].link_mode = "copy"  # the branch now has files of its own
    engine.wait_for_everyone()
    return BranchTrainResult(
        name,
        branch_dir,
        result.steps,
        result.tokens,
        result.resumed_from,
        result.last_row.get("loss", float("nan")),
        result.eval,
        dtype_name(dtype),
        saved.unchanged_share if saved else None,
    )
