"""The one output guard: what a command may write, and what ``--force`` may replace.

Every command that writes a directory or a file checks it here before any work starts
(:func:`guard_output`), and writes it atomically (``atomic_output_dir``, :func:`write_file`):

- an output never is, contains or lies inside one of the command's inputs (paths resolved,
  symlinks followed); a run directory may hold outputs (RUN_DIR/mixed, RUN_DIR/report.html) but
  is never replaced, and its manifest never overwritten;
- an existing output is replaced only with ``--force``, and ``--force`` replaces only an earlier
  output of the same kind, recognised by what moekit writes into it (:func:`recognise`): a model
  directory by its provenance ``moekit.yaml``, a run by its manifest, a token store by
  ``moekit-store.json``, a recipe work directory by ``recipe.yaml``, a report page by its title,
  a JSON report by its keys. A directory moekit did not write, a model it did not make, a run's
  manifest or a model's ``config.json`` are never replaced, ``--force`` or not.

The markers are read as plain files here (this module knows no family and no schema beyond the
keys that tell one output from another).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import yaml

from moekit.errors import InvalidOptionError, OutputExistsError
from moekit.io.atomic import remove_stale_temporaries, temporary_dir, write_text_atomic, writing

OutputKind = Literal[
    "model", "branch", "run", "store", "workdir", "plots", "page", "eval report", "routing report", "generation"
]
DIRECTORY_KINDS = ("model", "branch", "run", "store", "workdir", "plots")

# The names of the files that say what a directory is (the manifest and a model's provenance share the name).
MOEKIT_YAML = "moekit.yaml"
STORE_MARKER = "moekit-store.json"
WORKDIR_MARKER = ".moekit-workdir"  # written by `moekit run` into its work directory (next to recipe.yaml)
_RECIPE_AS_RUN = "recipe.yaml"  # the recipe as run; marks the work directories of earlier versions
_JSON_KEYS: dict[str, set[str]] = {  # the keys every JSON report of that kind has
    "eval report": {"results", "best"},
    "task report": {"results", "task"},
    "routing report": {"model", "static"},
    "generation": {"prompt", "tokens"},
}
# How a directory that moekit did not write is described, by the kind that was to be written there.
_NOT_OURS = {
    "model": "not a model or run directory (no config.json or moekit.yaml)",
    "store": "not a token store (no moekit-store.json)",
    "workdir": "not a moekit work directory (no .moekit-workdir)",
    "plots": "not an inspect --plot directory (no report.html of moekit inspect)",
}
_NOT_OURS["run"] = _NOT_OURS["branch"] = _NOT_OURS["model"]
_PAGE_TITLES = {"page": "<title>moekit report", "plots": "<title>moekit inspect"}


def _yaml_mapping(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run manifest (``moekit.yaml`` with a ``manifest_version``)."""
    record = _yaml_mapping(Path(path) / MOEKIT_YAML)
    return record is not None and "manifest_version" in record


def is_workdir(path: Path) -> bool:
    """Whether ``path`` is the work directory of a recipe run: its marker, or (written before the marker) a
    ``recipe.yaml`` that is a recipe as run, naming this very directory as its resolved workdir."""
    path = Path(path)
    if (path / WORKDIR_MARKER).is_file():
        return True
    recipe = _yaml_mapping(path / _RECIPE_AS_RUN)
    if recipe is None or "recipe_version" not in recipe or not isinstance(recipe.get("workdir"), str):
        return False
    return Path(recipe["workdir"]).is_absolute() and Path(recipe["workdir"]).resolve() == path.resolve()


def _json_keys(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _page_title(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(4096)
    except OSError:
        return ""


def recognise(path: Path) -> str | None:
    """What kind of moekit output ``path`` is (one of :data:`OutputKind`), or None for anything else."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".html" and _PAGE_TITLES["page"] in _page_title(path):
            return "page"
        keys = _json_keys(path)
        found = next((kind for kind, needed in _JSON_KEYS.items() if needed <= keys), None)
        return "eval report" if found == "task report" else found  # eval --json writes either
    if not path.is_dir():
        return None
    if is_run_dir(path):
        return "run"
    if (path / STORE_MARKER).is_file():
        return "store"
    if is_workdir(path):
        return "workdir"
    if (path / "config.json").is_file():
        return _model_kind(path)
    if _PAGE_TITLES["plots"] in _page_title(path / "report.html"):
        return "plots"
    return None


def _model_kind(path: Path) -> str | None:
    """A model directory moekit wrote: a run's branch, a model with moekit provenance, or (written before every
    model had provenance) a model in a run directory or a recipe's work directory."""
    absolute = path.absolute()
    if absolute.parent.name == "branches" and is_run_dir(absolute.parent.parent):
        return "branch"
    if _yaml_mapping(path / MOEKIT_YAML) is not None:
        return "model"
    if is_run_dir(absolute.parent) or is_workdir(absolute.parent):
        return "model"
    return None


def _check_apart(out: Path, inputs: Iterable[Path], run_dir: Path | None) -> None:
    """Refuse an output that is, contains or lies inside an input, or is or contains the run directory."""
    target = Path(out).resolve()
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if run.is_relative_to(target):
            raise InvalidOptionError(
                f"The output {out} is or contains the run directory {run_dir}; writing it would destroy the run.",
                "Use the default output inside the run directory, or another directory.",
            )
        if target == run / MOEKIT_YAML:
            raise InvalidOptionError(
                f"The output {out} is the run manifest of {run_dir}; writing it would make the run unreadable.",
                "Write the output elsewhere.",
            )
    for path in inputs:
        source = Path(path).resolve()
        if source.is_relative_to(target) or target.is_relative_to(source):
            raise InvalidOptionError(
                f"The output {out} overlaps the input {path}; writing it would destroy inputs.",
                "Choose an output outside the seed, the branches, the data and the other inputs.",
            )


def _check_replaceable(out: Path, kind: str, force: bool) -> None:
    """Refuse an existing output unless ``force`` is given and it is an earlier output of ``kind``."""
    out = Path(out)
    directory = kind in DIRECTORY_KINDS
    if directory and out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"The output path {out} exists and is a file, not a directory.",
            "Choose another --out path or remove the file.",
        )
    if not directory and out.is_dir():
        raise InvalidOptionError(f"The output {out} is a directory.", f"Give a file path, such as {out / 'out.json'}.")
    exists = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if not exists:
        return
    if not force:
        what = "directory" if directory else "file"
        raise OutputExistsError(
            f"The output {what} {out} already exists{' and is not empty' if directory else ''}.",
            "Choose another output path, or pass --force to replace it.",
        )
    found = recognise(out)
    if found == kind:
        return
    if found is None and directory:
        raise OutputExistsError(
            f"The output directory {out} is {_NOT_OURS.get(kind, _NOT_OURS['model'])}; "
            "--force replaces only what moekit writes, and would delete everything in it.",
            "Choose an --out path that is new, empty, or an earlier moekit output.",
        )
    what = f"a moekit {found}" if found else "a file moekit did not write"
    raise OutputExistsError(
        f"The output {out} is {what}, not an earlier {kind}; --force replaces only an earlier output of the same kind.",
        "Choose another output path.",
    )


def check_writable_parent(out: Path) -> None:
    """Refuse an output whose nearest existing ancestor is a file or cannot be written (read-only disk, permissions)."""
    ancestor = Path(out).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidOptionError(
            f"Cannot create {out}: {ancestor} is not a directory.", "Choose an output path under a directory."
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidOptionError(
            f"Cannot write {out}: {ancestor} is not writable (read-only file system or no permission).",
            "Choose an output location you can write to.",
        )


def guard_output(
    out: Path, kind: OutputKind, force: bool = False, inputs: Iterable[Path] = (), run_dir: Path | None = None
) -> None:
    """Refuse, before any work, an output that would destroy an input, the run, or something moekit did not write.

    ``inputs``: every directory and file the command reads; ``run_dir``: a run directory the output
    may lie in but never replace. ``force``: replace an existing earlier output of ``kind``.
    """
    _check_apart(out, inputs, run_dir)
    _check_replaceable(out, kind, force)
    check_writable_parent(out)


def write_file(path: Path, text: str, kind: OutputKind, force: bool = False) -> Path:
    """Write a file output atomically (temp file + rename), as :func:`guard_output` allows; return its path."""
    _check_replaceable(path, kind, force)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), text)
    return Path(path)


@contextlib.contextmanager
def atomic_output_dir(out: Path, kind: OutputKind, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes the output directory ``out`` when the block exits without error.

    An existing ``out`` is replaced only as :func:`guard_output` allows (with ``force``, an earlier
    output of ``kind``); the old directory is moved aside first and deleted only after the new one
    is in place. On any exception the temporary directory is removed: nothing half-written remains.
    """
    out = Path(out).absolute()
    _check_replaceable(out, kind, force)
    check_writable_parent(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, out.name)
    tmp = temporary_dir(out.parent, out.name, "tmp")
    try:
        with writing(out, str(out)):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:  # again: another job may have written the output meanwhile (without --force, it is not replaced)
        _check_replaceable(out, kind, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = temporary_dir(out.parent, out.name, "old")
        os.rename(out, old / "replaced")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
