"""``moekit branch``: create a run directory with one dense copy of the seed per domain.

Branch directories are filled with reflinks or hard links to the seed's files where the
filesystem allows (no extra disk use), or real copies with ``copy=True``. Writers that update a
branch later (``train``) replace files through new inodes, never write into them, so a hard
link shared with the seed is never modified. The run directory is built in a temporary
directory and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.errors import InvalidOptionError
from moekit.io.checkpoint import Checkpoint
from moekit.io.files import (
    TOKENIZER_AND_GENERATION_FILES,
    link_or_copy,
    sha256_files,
    write_tokenizer_file,
)
from moekit.io.locks import exclusive, idle_run
from moekit.io.outputs import atomic_output_dir, guard_output
from moekit.io.source import resolve_model_dir
from moekit.manifest import (
    BranchRecord,
    RunManifest,
    SeedRecord,
    StageRecord,
    save_manifest,
    validate_branch_names,
)
from moekit.models import open_dense_model


@dataclass(frozen=True)
class BranchResult:
    """What ``branch`` created."""

    run_dir: Path
    branches: dict[str, Path]
    link_mode: str
    seed_sha256: str


def _seed_files(seed_dir: Path) -> tuple[Checkpoint, list[Path], list[str]]:
    """The validated seed, its weight files and config.json (linked into a branch), and its tokenizer/generation
    files."""
    checkpoint, _ = open_dense_model(seed_dir)
    extras = [n for n in TOKENIZER_AND_GENERATION_FILES if (seed_dir / n).is_file()]
    return checkpoint, checkpoint.weight_files() + [seed_dir / "config.json"], extras


def _clone_seed(seed_dir: Path, weights: list[Path], extras: list[str], target: Path, copy: bool) -> set[str]:
    """Fill ``target`` with links (or copies) of the seed's files; return how the weights were cloned.

    tokenizer_config.json is written portable (transformers-4 readable) where the seed's is not.
    """
    for name in extras:
        write_tokenizer_file(seed_dir, target, name, link=True, force_copy=copy)
    return {link_or_copy(src, target / src.name, force_copy=copy) for src in weights}


def branch(seed: str, run_dir: Path, domains: list[str], copy: bool = False, force: bool = False) -> BranchResult:
    """Validate ``seed`` and create ``run_dir`` with ``branches/<domain>/`` copies and ``moekit.yaml``."""
    validate_branch_names(domains)
    seed_dir = resolve_model_dir(seed)
    run_dir = Path(run_dir).absolute()
    guard_output(run_dir, "run", force, [seed_dir])  # --force must never delete the seed with the old run
    checkpoint, weights, extras = _seed_files(seed_dir)
    seed_sha256 = sha256_files(weights + [seed_dir / n for n in extras])
    modes: set[str] = set()
    with idle_run(run_dir), atomic_output_dir(run_dir, "run", force=force) as tmp:  # no job writes the old run
        for name in domains:
            target = tmp / "branches" / name
            target.mkdir(parents=True)
            modes |= _clone_seed(seed_dir, weights, extras, target, copy)
        link_mode = "copy" if "copy" in modes else ("hardlink" if "hardlink" in modes else "reflink")
        manifest = RunManifest(
            seed=SeedRecord(source=str(seed), path=str(seed_dir), sha256=seed_sha256, model_type=checkpoint.model_type),
            branches={n: BranchRecord(path=f"branches/{n}", link_mode=link_mode) for n in domains},
            stages=[StageRecord(stage="branch", params={"domains": domains, "copy": copy})],
        )
        save_manifest(tmp, manifest)
    return BranchResult(run_dir, {n: run_dir / "branches" / n for n in domains}, link_mode, seed_sha256)


def seed_hash(seed_dir: Path) -> str:
    """The hash ``branch`` records for a seed: its weight files, config.json and tokenizer/generation files."""
    _, weights, extras = _seed_files(seed_dir)
    return sha256_files(weights + [seed_dir / n for n in extras])


def add_branches(seed: str, run_dir: Path, domains: list[str], copy: bool = False) -> BranchResult:
    """Add branches for new ``domains`` to an existing run (``branch --add``): the seed must be the run's own.

    Each new branch directory is built aside and renamed into place; the manifest is updated last.
    """
    from moekit.errors import IncompatibleModelsError
    from moekit.manifest import load_manifest, updating_manifest

    validate_branch_names(domains)
    run_dir = Path(run_dir).absolute()
    manifest = load_manifest(run_dir)
    taken = [d for d in domains if d in manifest.branches]
    if taken:
        raise InvalidOptionError(
            f"The run already has branch(es) {', '.join(taken)}.",
            "Choose new domain names (or leave out --add to start a new run).",
        )
    seed_dir = resolve_model_dir(seed)
    _, weights, extras = _seed_files(seed_dir)
    digest = sha256_files(weights + [seed_dir / n for n in extras])
    if digest != manifest.seed.sha256:
        raise IncompatibleModelsError(
            f"{seed} is not the seed of {run_dir} (its files hash to {digest[:12]}, the run's seed "
            f"{manifest.seed.path} to {manifest.seed.sha256[:12]}).",
            f"Branch from the run's own seed: moekit branch {manifest.seed.path} {run_dir} --domain NAME --add.",
        )
    import shutil

    modes: set[str] = set()
    created: dict[str, Path] = {}
    try:
        for name in domains:
            target = run_dir / "branches" / name
            with atomic_output_dir(target, "branch") as tmp:
                modes |= _clone_seed(seed_dir, weights, extras, tmp, copy)
            created[name] = target
        link_mode = "copy" if "copy" in modes else ("hardlink" if "hardlink" in modes else "reflink")
        with updating_manifest(run_dir) as current:
            for name in domains:
                current.branches[name] = BranchRecord(path=f"branches/{name}", link_mode=link_mode)
            current.stages.append(StageRecord(stage="branch", params={"domains": domains, "copy": copy, "add": True}))
    except BaseException:
        for path in created.values():  # all or nothing: a rerun must not find half the branches on disk
            shutil.rmtree(path, ignore_errors=True)
        raise
    return BranchResult(run_dir, created, link_mode, digest)


def relink_branch(run_dir: Path, name: str) -> None:
    """Make branch ``name`` a fresh copy of the run's seed again (discarding its training).

    The new directory is built aside and swapped in, so a failure leaves the old branch.
    """
    from moekit.manifest import load_manifest

    manifest = load_manifest(run_dir)
    seed_dir = Path(manifest.seed.path)
    _, weights, extras = _seed_files(seed_dir)
    lock = exclusive(Path(run_dir) / f".train-{name}.lock", f"Branch '{name}' of {run_dir}")
    with lock, atomic_output_dir(manifest.branch_dir(run_dir, name), "branch", force=True) as tmp:
        _clone_seed(seed_dir, weights, extras, tmp, copy=False)
