"""The run manifest: ``RUN_DIR/moekit.yaml``.

A run directory is the unit a user works with. Its manifest records the seed (source, local
path, content hash), the branches (directory, data slots filled by ``train``) and a record per
stage that ran, so later commands need no repeated paths. The file is versioned: a moekit that
finds a newer ``manifest_version`` than it knows refuses instead of guessing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moekit import __version__
from moekit.errors import InvalidOptionError, ManifestError
from moekit.io.atomic import write_text_atomic

MANIFEST_NAME = "moekit.yaml"
MANIFEST_VERSION = 2  # 2: branches record their held-out split (version 1 manifests are read and upgraded)

# A branch name is a directory name (branches/NAME) and a key of the manifest; the reserved ones
# are the run's own model directories.
_BRANCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_NAMES = {"seed", "mixed", "tuned"}
# The equal-compute baselines: their stage records and their model directories in a run.
DENSE_STAGE, UPCYCLE_STAGE = "baseline:dense", "baseline:upcycle"
DENSE_DIR, UPCYCLED_DIR = "dense", "upcycled"


def validate_branch_names(domains: list[str]) -> None:
    """Raise InvalidOptionError unless the domain names are valid, unique and not reserved."""
    if not domains:
        raise InvalidOptionError(
            "No domains given.", "Pass at least one --domain NAME (e.g. --domain code --domain math)."
        )
    for name in domains:
        if not _BRANCH_NAME.match(name) or name.lower() in RESERVED_NAMES:
            raise InvalidOptionError(
                f"'{name}' is not a valid branch name.",
                "Use letters, digits, '-', '_' or '.', at most 64 characters, and not seed/mixed/tuned.",
            )
    duplicates = sorted({d for d in domains if domains.count(d) > 1})
    if duplicates:
        raise InvalidOptionError(f"Domain names repeat: {', '.join(duplicates)}.", "Give each --domain once.")


def now_iso() -> str:
    """Current UTC time as an ISO-8601 string (seconds precision)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeedRecord(_Strict):
    """The dense model every branch starts from."""

    source: str = Field(description="what the user passed: a directory or a hub id")
    path: str = Field(description="absolute local directory of the seed")
    sha256: str = Field(description="hash of the seed's weight, config and tokenizer files")
    model_type: str


class HeldoutRecord(_Strict):
    """How a domain's held-out data was chosen, recorded the first time the domain is split.

    ``data_key`` identifies the training data's token stores. With ``val_key`` the held-out data
    is other data (``--val-data``); otherwise tokens ``[start, tokens)`` of the training data are
    held out, and every command (train, tune, eval, the recipe stages) uses exactly that range.
    """

    data_key: str
    tokens: int
    start: int | None = None
    val_fraction: float | None = None
    val_key: str | None = None


class BranchRecord(_Strict):
    """One branch: a dense copy of the seed trained on one domain."""

    path: str = Field(description="directory, relative to the run directory")
    data: list[str] = Field(default_factory=list, description="training data paths (filled by train)")
    val_data: list[str] = Field(default_factory=list, description="validation data paths")
    link_mode: str = Field(default="copy", description="how the seed files were copied")
    heldout: HeldoutRecord | None = Field(default=None, description="the domain's recorded held-out split")


class StageRecord(_Strict):
    """What one command did to the run."""

    stage: str
    at: str = Field(default_factory=now_iso)
    moekit_version: str = __version__
    params: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict)


class RunManifest(_Strict):
    """The whole ``moekit.yaml``."""

    manifest_version: int = MANIFEST_VERSION  # written as the current version: a read manifest is upgraded on save
    created: str = Field(default_factory=now_iso)
    seed: SeedRecord
    branches: dict[str, BranchRecord]
    stages: list[StageRecord] = Field(default_factory=list)

    def branch_dir(self, run_dir: Path, name: str) -> Path:
        """Absolute directory of branch ``name``; it must lie inside the run directory.

        train replaces a branch directory: a hand-edited ``path: ../seed`` would otherwise make
        it overwrite the seed, or any other directory.
        """
        run = Path(run_dir).absolute()
        path = run / self.branches[name].path
        if not path.resolve().is_relative_to(run.resolve()) or path.resolve() == run.resolve():
            raise ManifestError(
                f"Branch '{name}' has path {self.branches[name].path!r} in {run / MANIFEST_NAME}, which is "
                "outside the run directory.",
                f"Branch paths must stay inside the run (moekit branch writes branches/{name}); fix the path in "
                "moekit.yaml.",
            )
        return path


def load_manifest(run_dir: Path) -> RunManifest:
    """Read and validate ``run_dir/moekit.yaml``; raise ManifestError with a fix if it is bad."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{run_dir} is not a moekit run directory (no {MANIFEST_NAME}).",
            "Create one with: moekit branch SEED RUN_DIR --domain NAME ...",
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"Cannot read {path}: {reason}.", "Fix the YAML or recreate the run directory.")
    version = raw.get("manifest_version") if isinstance(raw, dict) else None
    if version is None and isinstance(raw, dict) and ({"stage", "tune", "moekit_version"} & set(raw)):
        raise ManifestError(
            f"{run_dir} is a model directory (its {MANIFEST_NAME} records how moekit made the model), "
            "not a run directory.",
            "Give the run directory the model belongs to (e.g. the parent of mixed/ or tuned/).",
        )
    if not isinstance(version, int):
        raise ManifestError(f"{path} has no integer manifest_version.", "Recreate the run directory.")
    if version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path} was written by a newer moekit (manifest version {version}; this moekit "
            f"{__version__} reads up to {MANIFEST_VERSION}).",
            "Upgrade moekit to a version that reads it.",
        )
    raw["manifest_version"] = MANIFEST_VERSION  # version 1 lacks only optional fields
    try:
        return RunManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path} is not a valid run manifest:\n{exc}", "Fix the listed fields.")


def save_manifest(run_dir: Path, manifest: RunManifest) -> None:
    """Write the manifest atomically (a crash never leaves a truncated moekit.yaml)."""
    text = yaml.safe_dump(manifest.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    write_text_atomic(Path(run_dir) / MANIFEST_NAME, text)


@contextlib.contextmanager
def updating_manifest(run_dir: Path) -> Iterator[RunManifest]:
    """Read the manifest under an exclusive lock, let the caller change it, and save it.

    Jobs that train different branches of one run at the same time (one cluster job per branch)
    each add their records; reading fresh under the lock keeps one job from dropping another's.
    """
    with open(Path(run_dir) / ".moekit.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = load_manifest(run_dir)
            yield manifest
            save_manifest(run_dir, manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
