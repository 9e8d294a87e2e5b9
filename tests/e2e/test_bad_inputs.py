"""An adversarial battery: every bad input or fault gets a clear message, a non-zero exit and leaves nothing behind.

Each case runs the real CLI (in process) against a small world (a seed, a run, data, a mixed MoE)
and asserts: exit code != 0, no traceback, an ``error:`` line naming the problem and a ``fix:``
line, and the world unchanged (no new, removed or modified file; the token cache aside). Cases
that need a broken input build their own copy first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.tiny import domain_corpus

LOOP = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--eval-blocks", "1"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@dataclass
class World:
    root: Path
    seed: Path
    run: Path
    mixed: Path
    code: Path
    math: Path

    def copy_run(self, name: str) -> Path:
        """A separate copy of the run without its mixed model (for cases that break it on purpose)."""
        target = self.root / "scratch" / name
        shutil.copytree(
            self.run, target, symlinks=True, ignore=lambda d, names: ["mixed"] if Path(d) == self.run else []
        )
        return target


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from moekit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("world")
    seed = build_tiny_model(root / "models" / "seed", "llama")
    code, math = root / "data" / "code.txt", root / "data" / "math.txt"
    code.parent.mkdir()
    code.write_text(domain_corpus("code", 200))
    math.write_text(domain_corpus("math", 200))
    assert cli("branch", seed, root / "run", "--domain", "code", "--domain", "math", "--copy").exit_code == 0
    result = cli("train", root / "run", "--data", f"code={code}", "--data", f"math={math}", *LOOP)
    assert result.exit_code == 0, result.output
    assert cli("mix", root / "run").exit_code == 0
    return World(root, seed, root / "run", root / "run" / "mixed", code, math)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every file (directories as ''), caches and locks aside; the cases' own
    inputs in scratch/ (a stranger's thesis.tex among them) are included."""
    result = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if "/.cache" in f"/{relative}" or path.name == ".moekit.lock":
            continue
        result[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
    return result


def assert_refused(result, *fragments: str) -> None:
    """Exit != 0, no traceback, an error and a fix line, and every fragment in the message."""
    output = result.output
    assert result.exit_code not in (0, None), output
    assert "Traceback" not in output and (result.exception is None or isinstance(result.exception, SystemExit)), output
    assert "error:" in output and "fix:" in output, output
    flat = " ".join(output.split())
    for fragment in fragments:
        assert " ".join(fragment.split()) in flat, (fragment, output)


# --- inputs broken on purpose ------------------------------------------------------------


def _rewrite_safetensors(path: Path, change: Callable[[dict], None]) -> None:
    """Edit a safetensors header in place of its file (a new inode: links to other files stay intact)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.unlink()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def nan_branch(world: World) -> list:
    run = world.copy_run("nan")
    path = run / "branches" / "code" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})
    return ["mix", run]


def lying_header(world: World) -> list:
    run = world.copy_run("header")

    def shrink(header: dict) -> None:  # shape says fewer rows than the bytes hold
        header["model.layers.0.mlp.down_proj.weight"]["shape"][0] -= 1

    _rewrite_safetensors(run / "branches" / "code" / "model.safetensors", shrink)
    return ["mix", run]


def overlapping_header(world: World) -> list:
    run = world.copy_run("overlap")

    def overlap(header: dict) -> None:  # two tensors of equal size pointing at the same bytes
        a, b = header["model.layers.0.self_attn.q_proj.weight"], header["model.layers.0.self_attn.o_proj.weight"]
        b["data_offsets"] = list(a["data_offsets"])

    _rewrite_safetensors(run / "branches" / "math" / "model.safetensors", overlap)
    return ["mix", run]


def more_layers_in_config(world: World) -> list:
    run = world.copy_run("layers")
    config_path = run / "branches" / "math" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 4
    config_path.unlink()
    config_path.write_text(json.dumps(config))
    return [
        "mix",
        "--expert",
        f"math={run / 'branches' / 'math'}",
        "--no-seed-expert",
        "--seed-model",
        run / "branches" / "math",
        "--out",
        run / "out",
        "--top-k",
        "1",
    ]


def eval_of_incomplete_model(world: World) -> list:
    model = world.root / "scratch" / "incomplete"
    shutil.copytree(world.mixed, model)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(config))
    return ["eval", model, "--data", f"code={world.code}", "--seq-len", "32"]


def branch_path_outside(world: World) -> list:
    run = world.copy_run("outside")
    manifest = run / "moekit.yaml"
    manifest.write_text(manifest.read_text().replace("path: branches/code", "path: ../../models/seed"))
    return ["train", run, "--branch", "code", *LOOP]


def deleted_branch(world: World) -> list:
    run = world.copy_run("deleted")
    shutil.rmtree(run / "branches" / "math")
    return ["train", run, "--branch", "math", *LOOP]


def damaged_checkpoint(world: World) -> list:
    run = world.copy_run("damaged")
    step = run / "train" / "code" / "checkpoints" / "step-1"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{not json")
    return ["train", run, "--branch", "code", "--resume", *LOOP]


def tokenizerless_seed(world: World) -> list:
    seed = world.root / "scratch" / "no-tokenizer"
    shutil.copytree(world.seed, seed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (seed / name).unlink()
    return ["branch", seed, world.root / "scratch" / "no-tokenizer-run", "--domain", "a"]


def stranger_dir_with_force(world: World, command: str) -> list:
    stranger = world.root / "scratch" / f"stranger-{command}"
    stranger.mkdir(parents=True)
    (stranger / "thesis.tex").write_text("years of work")
    if command == "mix":
        return ["mix", world.run, "--out", stranger, "--force"]
    if command == "branch":
        return ["branch", world.seed, stranger, "--domain", "a", "--force"]
    return ["demo", "--tiny", "--out", stranger, "--force"]


def recipe(world: World, name: str, **changes) -> list:
    """A copy of the tiny recipe with top-level changes (a value None removes the key)."""
    import yaml

    from moekit.steps.demo import packaged_recipe

    data = yaml.safe_load(packaged_recipe("demo-tiny").read_text())
    for key, value in changes.items():
        data[key] = value
    path = world.root / "scratch" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return ["run", path]


def workdir_is_a_file(world: World) -> list:
    target = world.root / "scratch" / "a-file"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("not a directory")
    return recipe(world, "file-workdir", workdir=str(target))


def tiny_data(world: World) -> list:
    path = world.root / "scratch" / "tiny.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x = 1\n")
    return ["train", world.copy_run("tiny-data"), "--branch", "code", "--data", path, *LOOP]


def empty_data(world: World) -> list:
    path = world.root / "scratch" / "empty.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("   \n")
    return ["train", world.copy_run("empty-data"), "--branch", "code", "--data", path, *LOOP]


def json_is_dir(world: World) -> list:
    return ["eval", world.mixed, "--data", f"code={world.code}", "--seq-len", "32", "--json", world.root / "data"]


def plot_is_file(world: World) -> list:
    return ["inspect", world.mixed, "--data", f"code={world.code}", "--seq-len", "32", "--plot", world.code]


# name -> (args, or a function of the world returning them; fragments the message must contain)
CASES: dict[str, tuple] = {
    # branch
    "branch: seed missing": (
        lambda w: ["branch", w.root / "nope", w.root / "scratch" / "r", "--domain", "a"],
        ["not found"],
    ),
    "branch: domain twice": (
        lambda w: ["branch", w.seed, w.root / "scratch" / "r", "--domain", "a", "--domain", "a"],
        ["repeat"],
    ),
    "branch: reserved name": (
        lambda w: ["branch", w.seed, w.root / "scratch" / "r", "--domain", "tuned"],
        ["not a valid branch name"],
    ),
    "branch: run dir contains the seed (--force)": (
        lambda w: ["branch", w.seed, w.seed.parent, "--domain", "a", "--force"],
        ["overlaps the input"],
    ),
    "branch: run dir is the seed (--force)": (
        lambda w: ["branch", w.seed, w.seed, "--domain", "a", "--force"],
        ["overlaps the input"],
    ),
    "branch: run dir is a file": (lambda w: ["branch", w.seed, w.code, "--domain", "a"], ["is a file"]),
    "branch: --force on a stranger's directory": (
        lambda w: stranger_dir_with_force(w, "branch"),
        ["not a model or run directory"],
    ),
    "branch: seed without a tokenizer": (tokenizerless_seed, ["no tokenizer files"]),
    # train
    "train: not a run directory": (lambda w: ["train", w.root / "data", *LOOP], ["not a moekit run directory"]),
    "train: --lr inf": (lambda w: ["train", w.run, "--branch", "code", *LOOP, "--lr", "inf"], ["finite"]),
    "train: --lr nan": (lambda w: ["train", w.run, "--branch", "code", *LOOP, "--lr", "nan"], ["finite"]),
    "train: --weight-decay inf": (
        lambda w: ["train", w.run, "--branch", "code", *LOOP, "--weight-decay", "inf"],
        ["finite"],
    ),
    "train: both budgets": (
        lambda w: ["train", w.run, "--branch", "code", *LOOP, "--max-tokens", "100"],
        ["exactly one"],
    ),
    "train: unknown branch": (lambda w: ["train", w.run, "--branch", "physics", *LOOP], ["Unknown branch"]),
    "train: data path missing": (
        lambda w: ["train", w.run, "--branch", "code", "--data", w.root / "nope.txt", *LOOP],
        ["does not exist"],
    ),
    "train: empty data": (empty_data, ["contains no text"]),
    "train: less data than a block": (tiny_data, ["fewer than one block"]),
    "train: --seq-len beyond the context": (
        lambda w: ["train", w.run, "--branch", "code", *LOOP, "--seq-len", "4096"],
        ["longer than the context"],
    ),
    "train: bad --save-dtype": (
        lambda w: ["train", w.run, "--branch", "code", *LOOP, "--save-dtype", "int8"],
        ["save_dtype"],
    ),
    "train: branch path outside the run": (branch_path_outside, ["outside the run directory"]),
    "train: branch directory deleted": (deleted_branch, ["missing"]),
    "train: damaged checkpoint": (damaged_checkpoint, ["is damaged", "trainer_state.json"]),
    # mix
    "mix: --expert-scale inf": (
        lambda w: ["mix", w.run, "--out", w.root / "scratch" / "m", "--expert-scale", "inf"],
        ["finite"],
    ),
    "mix: --out is the run (--force)": (lambda w: ["mix", w.run, "--out", w.run, "--force"], ["would destroy the run"]),
    "mix: --out inside a branch": (
        lambda w: ["mix", w.run, "--out", w.run / "branches" / "code" / "moe"],
        ["overlaps the input"],
    ),
    "mix: --out a stranger's directory (--force)": (
        lambda w: stranger_dir_with_force(w, "mix"),
        ["not a model or run directory"],
    ),
    "mix: branch with NaN weights": (nan_branch, ["NaN or infinite", "model.layers.1.mlp.up_proj.weight"]),
    "mix: header shape disagrees with its data": (
        lying_header,
        ["described as", "model.layers.0.mlp.down_proj.weight"],
    ),
    "mix: header spans overlap": (overlapping_header, ["overlap"]),
    "mix: config names more layers than the weights hold": (more_layers_in_config, ["num_hidden_layers=4"]),
    "mix: --router-sharpness out of range": (
        lambda w: [
            "mix",
            w.run,
            "--out",
            w.root / "scratch" / "m",
            "--router",
            "centroid",
            "--router-data",
            f"code={w.code}",
            "--router-data",
            f"math={w.math}",
            "--router-sharpness",
            "1.5",
        ],
        ["router_sharpness"],
    ),
    "mix: --router-seq-len beyond the context": (
        lambda w: [
            "mix",
            w.run,
            "--out",
            w.root / "scratch" / "m",
            "--router",
            "centroid",
            "--router-data",
            f"code={w.code}",
            "--router-data",
            f"math={w.math}",
            "--router-seq-len",
            "4096",
        ],
        ["longer than the context"],
    ),
    # tune
    "tune: --aux-coef inf": (lambda w: ["tune", w.run, *LOOP, "--aux-coef", "inf"], ["finite"]),
    "tune: --out is the run (--force)": (
        lambda w: ["tune", w.run, *LOOP, "--out", w.run, "--force"],
        ["would destroy the run"],
    ),
    "tune: --out is the MoE being tuned (--force)": (
        lambda w: ["tune", w.run, *LOOP, "--out", w.mixed, "--force"],
        ["overlaps the input"],
    ),
    "tune: --out is the seed (--force)": (
        lambda w: ["tune", w.run, *LOOP, "--out", w.seed, "--force"],
        ["overlaps the input"],
    ),
    "tune: a dense model": (
        lambda w: ["tune", w.seed, "--data", f"code={w.code}", "--out", w.root / "scratch" / "t", *LOOP],
        ["no routers"],
    ),
    "tune: mixture names an unknown domain": (
        lambda w: ["tune", w.run, *LOOP, "--mix", "code=1,physics=1"],
        ["mixture names"],
    ),
    "tune: --seq-len beyond the context": (
        lambda w: ["tune", w.run, *LOOP, "--seq-len", "4096"],
        ["longer than the context"],
    ),
    # eval and inspect
    "eval: --json is a directory": (json_is_dir, ["is a directory"]),
    "eval: a model with missing layers": (eval_of_incomplete_model, ["does not hold every weight"]),
    "eval: --seq-len beyond the context": (
        lambda w: ["eval", w.mixed, "--data", f"code={w.code}", "--seq-len", "4096"],
        ["longer than the context"],
    ),
    "eval: no data": (lambda w: ["eval", w.mixed], ["No evaluation data"]),
    "inspect: --plot is a file": (plot_is_file, ["is a file"]),
    "inspect: routing of a dense model": (
        lambda w: ["inspect", w.seed, "--data", f"code={w.code}", "--seq-len", "32"],
        ["no routers"],
    ),
    "inspect: --tokens for a domain without data": (
        lambda w: ["inspect", w.mixed, "--data", f"code={w.code}", "--tokens", "math"],
        ["has no --data"],
    ),
    # recipes and the demo
    "run: workdir is a file": (workdir_is_a_file, ["is a file"]),
    "run: infinite learning rate": (
        lambda w: recipe(w, "inf-lr", train={"seq_len": 64, "max_steps": 2, "lr": float("inf")}),
        ["finite"],
    ),
    "run: unknown key": (lambda w: recipe(w, "typo", trian={"max_steps": 2}), ["trian"]),
    "demo: --force on a stranger's directory": (
        lambda w: stranger_dir_with_force(w, "demo"),
        ["not a moekit work directory"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_cleanly(case, world):
    make_args, fragments = CASES[case]
    args = make_args(world)
    before = snapshot(world.root)
    result = cli(*args)
    assert_refused(result, *fragments)
    assert snapshot(world.root) == before, "the refused command changed files"


def test_battery_is_large_enough():
    assert len(CASES) >= 40
