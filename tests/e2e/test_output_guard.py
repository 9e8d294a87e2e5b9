"""Every option that writes a file or a directory, pointed at what it must never replace: refused, nothing changed.

One row per (command, output option) in :data:`WRITERS`; each row is tried against the command's
own inputs, the run directory, the run manifest, a model's ``config.json`` and a token store,
with and without ``--force``. A test also lists every command's output options from the command
table, so a new command or option fails here until it has its row.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moekit.cli import COMMANDS, build_app
from moekit.tiny import domain_corpus

LOOP = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--eval-every", "0"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@dataclass
class World:
    root: Path
    seed: Path
    run: Path
    mixed: Path
    store: Path
    code: Path
    math: Path
    recipe: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_seed) -> World:
    root = tmp_path_factory.mktemp("guard")
    seed = make_seed("llama", root / "seed")
    code, math = root / "data" / "code.txt", root / "data" / "math.txt"
    code.parent.mkdir()
    code.write_text(domain_corpus("code", 200))
    math.write_text(domain_corpus("math", 200))
    run = root / "run"
    assert cli("branch", seed, run, "--domain", "code", "--domain", "math", "--copy").exit_code == 0
    manifest = yaml.safe_load((run / "moekit.yaml").read_text())
    manifest["branches"]["code"]["data"], manifest["branches"]["math"]["data"] = [str(code)], [str(math)]
    (run / "moekit.yaml").write_text(yaml.safe_dump(manifest))
    assert cli("mix", run).exit_code == 0
    store = root / "store"
    assert cli("prepare", code, "--tokenizer", seed, "--out", store).exit_code == 0
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "guard",
                "workdir": str(root / "work"),
                "seed": {"path": str(seed)},
                "domains": {"code": {"data": [str(code)]}},
                "stages": ["branch"],
            }
        )
    )
    return World(root, seed, run, run / "mixed", store, code, math, recipe)


@dataclass(frozen=True)
class Writer:
    """A command with one output pointed at TARGET, and the inputs that command reads."""

    args: Callable[[World, Path], list]
    inputs: Callable[[World], list[Path]]
    force: bool = True  # the command has --force


WRITERS: dict[tuple[str, str], Writer] = {
    ("branch", "RUN_DIR"): Writer(lambda w, t: ["branch", w.seed, t, "--domain", "a"], lambda w: [w.seed]),
    ("prepare", "--out"): Writer(
        lambda w, t: ["prepare", w.code, "--tokenizer", w.seed, "--out", t], lambda w: [w.code, w.seed]
    ),
    ("mix", "--out"): Writer(lambda w, t: ["mix", w.run, "--out", t], lambda w: [w.seed, w.run / "branches" / "code"]),
    ("mix --add-expert", "--out"): Writer(
        lambda w, t: [
            "mix",
            "--add-expert",
            f"law={w.seed}",
            "--into",
            w.mixed,
            "--out",
            t,
            "--router-data",
            f"law={w.math}",
            "--router-data",
            f"code={w.code}",
        ],
        lambda w: [w.mixed, w.seed, w.code],
    ),
    ("tune", "--out"): Writer(
        lambda w, t: ["tune", w.mixed, "--data", f"code={w.code}", "--out", t, *LOOP], lambda w: [w.mixed, w.code]
    ),
    ("eval", "--json"): Writer(
        lambda w, t: ["eval", w.mixed, "--data", f"code={w.code}", "--seq-len", "32", "--json", t],
        lambda w: [w.mixed, w.code],
    ),
    ("inspect", "--json"): Writer(
        lambda w, t: ["inspect", w.mixed, "--data", f"code={w.code}", "--seq-len", "32", "--json", t],
        lambda w: [w.mixed, w.code],
    ),
    ("inspect", "--plot"): Writer(
        lambda w, t: ["inspect", w.mixed, "--data", f"code={w.code}", "--seq-len", "32", "--plot", t],
        lambda w: [w.mixed, w.code],
    ),
    ("generate", "--json"): Writer(
        lambda w, t: ["generate", w.mixed, "--prompt", "x", "--raw", "--max-new-tokens", "2", "--json", t],
        lambda w: [w.mixed],
    ),
    ("report", "--out"): Writer(
        lambda w, t: ["report", w.run, "--out", t, "--no-generate", "--no-inspect"],
        lambda w: [w.mixed, w.seed, w.code],
    ),
    ("run", "workdir"): Writer(lambda w, t: ["run", w.recipe, f"workdir={t}"], lambda w: [w.seed, w.code], False),
    ("demo", "--out"): Writer(lambda w, t: ["demo", "--tiny", "--out", t], lambda w: []),
}
# What each writer writes, so that pointing it at an earlier output of that very kind (which --force may
# replace) is left out of the refusals below.
OWN_KIND = {("branch", "RUN_DIR"): "run", ("prepare", "--out"): "store"}
TARGETS: dict[str, Callable[[World], Path]] = {
    "the run directory": lambda w: w.run,
    "the run manifest": lambda w: w.run / "moekit.yaml",
    "a model's config.json": lambda w: w.seed / "config.json",
    "an MoE's config.json": lambda w: w.mixed / "config.json",
    "a token store": lambda w: w.store,
}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (directories as ''), caches and locks aside."""
    skip = (".cache", ".moekit.lock")
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
        if not any(part in skip for part in p.relative_to(root).parts)
    }


def assert_refused_and_unchanged(world: World, args: list) -> None:
    before = snapshot(world.root)
    result = cli(*args)
    output = result.output
    assert result.exit_code not in (0, None), output
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), output
    assert "error:" in output and "fix:" in output, output
    assert snapshot(world.root) == before, output


def _cases() -> list:
    cases = []
    for (command, option), writer in WRITERS.items():
        for target in TARGETS:
            if (command, option) == ("branch", "RUN_DIR") and target == "the run directory":
                continue  # branch --force recreates a run: its own kind (tested in test_branch)
            if (command, option) == ("prepare", "--out") and target == "a token store":
                continue  # prepare --force replaces an earlier store: its own kind
            for force in (False, True) if writer.force else (False,):
                cases.append(
                    pytest.param(
                        command,
                        option,
                        target,
                        force,
                        id=f"{command} {option} -> {target}{' --force' if force else ''}",
                    )
                )
        cases.append(pytest.param(command, option, "each of its inputs", True, id=f"{command} {option} -> its inputs"))
    return cases


@pytest.mark.parametrize(("command", "option", "target", "force"), _cases())
def test_an_output_never_replaces_what_it_must_not(world, command, option, target, force):
    writer = WRITERS[(command, option)]
    extra = ["--force"] if force and writer.force else []
    if target == "each of its inputs":
        for path in writer.inputs(world):
            assert_refused_and_unchanged(world, [*writer.args(world, path), *extra])
            assert_refused_and_unchanged(world, [*writer.args(world, path), *[]])
        return
    assert_refused_and_unchanged(world, [*writer.args(world, TARGETS[target](world)), *extra])


def _output_options(function: Callable) -> set[str]:
    """A command's options that name a file or directory it writes (--out, --json, --plot; RUN_DIR of branch)."""
    found = set()
    for name, parameter in inspect.signature(function).parameters.items():
        declared = getattr(parameter.default, "param_decls", None) or ()
        found |= {flag for flag in declared if flag in ("--out", "--json", "--plot")}
    return found


def test_every_output_option_has_a_row():
    rows = {(command.split()[0], option) for command, option in WRITERS}
    for name, function in COMMANDS:
        for option in _output_options(function):
            assert (name, option) in rows, f"moekit {name} {option} writes a file or directory: add its row to WRITERS"
