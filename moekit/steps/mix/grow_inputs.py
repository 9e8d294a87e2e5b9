"""The inputs of ``mix --add-expert``: the built MoE, the new dense branch, and the checks that they fit.

The MoE must be one moekit wrote (its provenance names the experts and the seed), stored in the
per-expert layout, mixed without ``--split``; the branch must be of the MoE's dense family with
the same non-FFN tensors and expert-sized FFNs, and come from the MoE's seed (checked on the run
manifests' seed records where both exist, else noted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moekit.arch import adapter_for_moe
from moekit.arch.base import DENSE_FFN_PROJECTIONS, LAYER_TENSOR, ArchAdapter
from moekit.config import GrowConfig
from moekit.errors import IncompatibleModelsError, InvalidOptionError
from moekit.io.checkpoint import Checkpoint
from moekit.manifest import MANIFEST_NAME, load_manifest
from moekit.models import open_dense_model
from moekit.provenance import origin, read_provenance


@dataclass
class GrowInputs:
    """The opened MoE and branch, and what the MoE's provenance says about it."""

    moe: Checkpoint
    branch: Checkpoint
    adapter: ArchAdapter
    record: dict[str, Any]  # the MoE's whole provenance
    model_record: dict[str, Any]  # the record that names its experts (mix's, or an earlier add-expert's)
    experts: int
    layers: list[int]
    down_scale: float
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        """Close the input files."""
        self.moe.close()
        self.branch.close()

    @cached_property
    def by_expert(self) -> dict[str, tuple[int, str]]:
        """MoE tensors indexed by expert along their first (or, for [1, E] biases, second) dim: name -> (layer,
        role)."""
        adapter, found = self.adapter, {}
        for layer in self.layers:
            found[adapter.router_name(layer)] = (layer, "router")
            bias = adapter.selection_bias_name(layer)
            if bias is not None:
                found[bias] = (layer, "selection_bias")
            if adapter.fused_experts is not None:
                gate_up, down = (f"model.layers.{layer}.{adapter.moe_block}.{n}" for n in adapter.fused_experts)
                found[gate_up] = (layer, "fused_gate_up")
                found[down] = (layer, "fused_down")
        return found


def grow_sources(
    run_dir: Path | None, add_expert: str, into: Path | None, out: Path | None
) -> tuple[str, Path, Path, Path]:
    """(name, branch directory, MoE to grow, output directory) from ``--add-expert NAME[=DIR]``, ``--into`` and
    ``--out``.

    With a run directory, NAME alone is the run's branch, the MoE is RUN_DIR/tuned (else RUN_DIR/mixed)
    and the output RUN_DIR/grown; without one, all three must be given.
    """
    name, sep, path = add_expert.partition("=")
    if run_dir is None:
        if not sep or into is None or out is None:
            raise InvalidOptionError(
                "--add-expert without a run directory needs NAME=DIR, --into MOE and --out DIR.",
                "E.g. moekit mix --add-expert law=branches/law --into tuned --out grown --router-data "
                "law=law.jsonl --router-data code=code.jsonl",
            )
        return name, Path(path), into, out
    manifest = load_manifest(run_dir)
    if not sep and name not in manifest.branches:
        raise InvalidOptionError(
            f"{run_dir} has no branch '{name}' (branches: {', '.join(manifest.branches)}).",
            f"Add it first: moekit branch {manifest.seed.path} {run_dir} --domain {name} --add, then train it.",
        )
    branch_dir = Path(path) if sep else manifest.branch_dir(run_dir, name)
    into = into or (run_dir / "tuned" if (run_dir / "tuned" / "config.json").is_file() else run_dir / "mixed")
    return name, branch_dir, into, out or run_dir / "grown"


def _read_provenance(moe_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MoE's whole provenance, and the record in it that names its experts (mix's, or an earlier add-expert's)."""
    record = read_provenance(moe_dir)
    found = origin(record, "expert_names")
    if record is None or found is None or not isinstance(found["expert_names"], list):
        raise InvalidOptionError(
            f"{moe_dir} has no moekit provenance (moekit.yaml naming its experts), so its seed and experts "
            "cannot be checked.",
            "--add-expert grows MoEs that `moekit mix` (and tune) wrote; mix other MoEs anew from their branches.",
        )
    return record, found


def _run_seed(model_dir: Path) -> tuple[str, str] | None:
    """(seed path, seed hash) from the run manifest of a branch directory (RUN_DIR/branches/NAME), if it has one."""
    run_dir = model_dir.absolute().parent.parent
    if not (run_dir / MANIFEST_NAME).is_file():
        return None
    manifest = load_manifest(run_dir)
    if not any(manifest.branch_dir(run_dir, n).resolve() == model_dir.resolve() for n in manifest.branches):
        return None
    return manifest.seed.path, manifest.seed.sha256


def _check_seed(record: dict[str, Any], branch_dir: Path, moe_dir: Path, notes: list[str]) -> None:
    """Refuse a branch whose run names another seed than the MoE's; note where it cannot be checked."""
    moe_seed = str(record.get("seed") or "")
    branch_seed = _run_seed(branch_dir)
    if branch_seed is None or not moe_seed:
        notes.append(
            "The branch's seed could not be checked (it is not a branch of a run directory): only the shapes were."
        )
        return
    seed_path, seed_hash = branch_seed
    if Path(seed_path).resolve() == Path(moe_seed).resolve():
        return
    moe_run_seed = _run_seed_by_path(moe_seed)
    if moe_run_seed is None:
        notes.append(
            f"The MoE's seed {moe_seed} is not found here, so the branch's seed could not be compared with it: "
            "only the shapes were."
        )
        return
    if moe_run_seed == seed_hash:
        return
    raise IncompatibleModelsError(
        f"The branch {branch_dir} was branched from the seed {seed_path}, but {moe_dir} was mixed from {moe_seed}.",
        "Branch the new domain from the MoE's seed (moekit branch SEED RUN_DIR --domain NAME --add), then train it.",
    )


def _run_seed_by_path(seed: str) -> str | None:
    """The hash of a seed's files as ``moekit branch`` computes it: a directory, or a hub id in the local
    cache (None if it cannot be found here)."""
    from moekit.errors import MoekitError
    from moekit.steps.branch import seed_hash

    path = Path(seed)
    if not path.is_dir():
        try:
            from moekit.io.source import resolve_model_dir

            path = resolve_model_dir(seed)
        except (MoekitError, OSError):
            return None
    return seed_hash(path)


def _moe_layers(moe: Checkpoint, adapter: ArchAdapter) -> list[int]:
    layouts = adapter.layouts()
    layout = layouts.detect(moe.tensors)
    if layout is None or layout != layouts.layouts[0]:
        raise InvalidOptionError(
            f"{moe.path} is not stored in the layout moekit writes (per-expert tensors), so experts cannot be "
            "appended in place.",
            "Re-save it with save_pretrained() (transformers' default layout), or grow the MoE moekit wrote.",
        )
    return layout.moe_layers(moe.tensors)


def _check_shapes(
    inputs_moe: Checkpoint, branch: Checkpoint, adapter: ArchAdapter, layers: list[int], experts: int
) -> None:
    """The branch must be the MoE's dense family with the same non-FFN tensors and expert-sized FFNs."""
    problems = []
    for name, info in inputs_moe.tensors.items():
        match = LAYER_TENSOR.match(name)
        if match is not None and (adapter.moe_block + ".") in match.group(2):
            continue
        if name in branch.tensors and branch.tensors[name].shape != info.shape:
            problems.append(f"{name}: MoE {info.shape}, branch {branch.tensors[name].shape}")
        elif name not in branch.tensors and name != "lm_head.weight":
            problems.append(f"{name} is missing from the branch")
    for layer in layers:
        for projection in DENSE_FFN_PROJECTIONS:
            expected = _expert_shape(inputs_moe, adapter, layer, projection, experts)
            dense = adapter.dense_ffn_name(layer, projection)
            got = branch.tensors[dense].shape if dense in branch.tensors else None
            if got != expected:
                problems.append(f"{dense}: {got}, the MoE's experts have {expected}")
    if problems:
        listing = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise IncompatibleModelsError(
            f"The branch {branch.path} does not fit the MoE {inputs_moe.path}: {listing}.",
            "The new expert must be a branch of the MoE's own seed (same family and sizes).",
        )


def _expert_shape(moe: Checkpoint, adapter: ArchAdapter, layer: int, projection: str, experts: int) -> tuple[int, ...]:
    """One expert's ``projection`` shape in the MoE (from the first expert, or a stacked tensor)."""
    if adapter.fused_experts is not None:
        gate_up, down = (f"model.layers.{layer}.{adapter.moe_block}.{n}" for n in adapter.fused_experts)
        if projection == "down_proj":
            return tuple(moe.tensors[down].shape[1:])
        _, rows, hidden = moe.tensors[gate_up].shape
        return (rows // 2, hidden)
    return tuple(moe.tensors[adapter.expert_name(layer, 0, projection)].shape)


def open_grow_inputs(cfg: GrowConfig) -> GrowInputs:
    """Open and check the MoE and the branch; raise a user error naming what does not fit."""
    moe = Checkpoint(Path(cfg.into))
    adapter = adapter_for_moe(moe.model_type)
    if adapter is None:
        raise InvalidOptionError(
            f"{cfg.into} is a {moe.model_type or 'unknown'} model, not an MoE moekit builds.",
            "Give the MoE that `moekit mix` (or tune) wrote.",
        )
    if int(moe.config.get("attention_experts") or 0) > 0:
        raise InvalidOptionError(
            f"{cfg.into} has attention experts (mix --attention-experts); --add-expert grows FFN experts only, "
            "and a new branch's attention would need a new attention expert and router row in every layer, "
            "which moekit does not build yet.",
            "Mix the new branch in from the start: moekit mix with all the branches and --attention-experts.",
        )
    groups = adapter.expert_groups(moe.config)
    if groups is not None:
        raise InvalidOptionError(
            f"{cfg.into} routes within {groups[0]} expert groups (mix --groups): one more expert would break the "
            "equal groups.",
            "Mix the new branch in from the start, with a --groups that divides the new expert count.",
        )
    record, found = _read_provenance(Path(cfg.into))
    if int(found.get("split") or 1) != 1:
        raise InvalidOptionError(
            f"{cfg.into} was mixed with --split {found['split']}: each source FFN is several experts sharing a "
            "router row.",
            "Add experts to MoEs mixed without --split.",
        )
    names = [str(n) for n in found["expert_names"]]
    if cfg.name in names:
        raise InvalidOptionError(
            f"The MoE already has an expert named '{cfg.name}' ({', '.join(names)}).",
            "Name the new expert differently.",
        )
    branch, branch_adapter = open_dense_model(Path(cfg.branch), target=moe.model_type)
    if branch_adapter.moe_type != adapter.moe_type:
        raise IncompatibleModelsError(
            f"The branch {cfg.branch} ({branch.model_type}) cannot join a {moe.model_type} MoE.",
            "Use a branch of the MoE's seed.",
        )
    experts = int(moe.config[adapter.num_experts_keys[0]])
    if experts != len(names):
        raise InvalidOptionError(
            f"{cfg.into}: config.json has {experts} experts, its moekit.yaml names {len(names)}.",
            "The provenance does not belong to these weights; re-mix the MoE.",
        )
    layers = _moe_layers(moe, adapter)
    _check_shapes(moe, branch, adapter, layers, experts)
    notes: list[str] = []
    _check_seed(found, Path(cfg.branch), Path(cfg.into), notes)
    down_scale = float((found.get("scales") or {}).get("routed_down", 1.0))
    return GrowInputs(moe, branch, adapter, record, found, experts, layers, down_scale, notes)
