"""What ``tune`` reads: the MoE and its data (from a run directory, a model of a run, or given), and the checks on
them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.config import TuneConfig
from moekit.data.sources import absolute_spec
from moekit.errors import InvalidOptionError
from moekit.manifest import MANIFEST_NAME, load_manifest
from moekit.provenance import origin, read_provenance, recorded


def work_dir_for(cfg: TuneConfig) -> Path:
    """Where checkpoints and metrics live while tuning: RUN_DIR/tune, or OUT.work next to OUT."""
    return (
        cfg.run_dir / cfg.stage.replace(":", "-")
        if cfg.run_dir is not None
        else cfg.out.parent / f"{cfg.out.name}.work"
    )


def lock_path(cfg: TuneConfig) -> Path:
    """The lock one tune job holds: ``.OUT.lock`` next to its output (RUN_DIR/.tuned.lock for a run's tune), so
    two jobs writing one output exclude each other however they name it."""
    out = cfg.out.resolve()
    return out.parent / f".{out.name}.lock"


def mixed_split(model_dir: Path) -> int:
    """The ``mix --split`` the MoE was built with (1 when unknown)."""
    split = recorded(model_dir, "split")
    return split if isinstance(split, int) and split > 0 else 1


def check_routing_mode(cfg: TuneConfig) -> None:
    """Refuse ablation modes that cannot mean what they say for this model and training choice."""
    if cfg.routing == "hash" and cfg.train == "router":
        raise InvalidOptionError(
            "--routing hash with --train router would train nothing: hash routing does not use the router.",
            "Use --train all or --train all-but-experts with hash routing.",
        )
    split = mixed_split(cfg.model)
    if split > 1 and cfg.routing in ("switch", "sample_top1"):
        raise InvalidOptionError(
            f"--routing {cfg.routing} sends each token to one expert, but {cfg.model} was mixed with --split {split}: "
            "one expert is a 1/{split} slice of an FFN, so top-1 routing would drop the rest of it.",
            "Use --routing topk, soft, noisy, expert_choice or hash for fine-grained MoEs.",
        )


def tune_inputs(cfg: TuneConfig) -> list[Path]:
    """Directories tune reads or that its input came from: the MoE, and the seed and branches it was mixed from.

    ``--out --force`` replaces the output; none of these may be, contain or lie inside it.
    """
    inputs = [Path(cfg.model)]
    record = origin(read_provenance(cfg.model), "seed")  # an unreadable one names no inputs
    if isinstance(record, dict):
        inputs += [Path(str(record["seed"]))] if record.get("seed") else []
        inputs += [
            Path(str(e["source"])) for e in record.get("experts") or [] if isinstance(e, dict) and e.get("source")
        ]
    if cfg.run_dir is not None:
        manifest = load_manifest(cfg.run_dir)
        inputs += [Path(manifest.seed.path)] + [manifest.branch_dir(cfg.run_dir, n) for n in manifest.branches]
    return [p for p in inputs if p.exists()]


def tune_sources(model: Path, data: dict[str, str], val_data: dict[str, str], out: Path | None) -> dict[str, Any]:
    """TuneConfig fields for the inputs: from a run directory (its mixed model and branch data), a model of a run
    (the run's data unless ``data`` is given), or an MoE directory (``data`` and ``out`` needed)."""

    given = {d: [absolute_spec(p)] for d, p in data.items()}
    given_val = {d: [absolute_spec(p)] for d, p in val_data.items()}
    if (model / "branches").is_dir() and (model / MANIFEST_NAME).is_file():
        branches = load_manifest(model).branches
        remembered = {name: record.data for name, record in branches.items() if record.data}
        remembered_val = {name: record.val_data for name, record in branches.items() if record.val_data and record.data}
        return {
            "model": model / "mixed",
            "data": {**remembered, **given},
            "val_data": {**remembered_val, **given_val},
            "out": out or model / "tuned",
            "run_dir": model,
        }
    run_dir = model.absolute().parent
    if model.name not in ("mixed", "tuned") and (run_dir / "branches").is_dir() and (run_dir / MANIFEST_NAME).is_file():
        # a model a run made besides its own mixed one (mix --add-expert's RUN_DIR/grown): the run's data unless --data
        # is given (as for `tune RUN_DIR`, whose recorded held-out splits are kept: a different split is refused)
        branches = load_manifest(run_dir).branches
        remembered = {name: record.data for name, record in branches.items() if record.data} if not given else {}
        remembered_val = (
            {name: record.val_data for name, record in branches.items() if record.val_data and record.data}
            if not given
            else {}
        )
        return {
            "model": model,
            "data": {**remembered, **given},
            "val_data": {**remembered_val, **given_val},
            "out": out or run_dir / f"{model.name}-tuned",
            "run_dir": run_dir,
            "stage": f"tune:{model.name}",
        }
    if out is None:
        raise InvalidOptionError(
            "No output directory.", "Pass --out DIR (or give a run directory, whose default is RUN_DIR/tuned)."
        )
    return {"model": model, "data": given, "val_data": given_val, "out": out, "run_dir": None}
