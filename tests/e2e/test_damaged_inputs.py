"""Damaged token stores and the smaller traps of a careless user: a clear message, an exit code, nothing changed.

Every case runs the real CLI against copies, and checks that no traceback reaches the user and
that every input's sha256 is the same afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.commands.common import environment_failure
from moekit.tiny import domain_corpus


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.parts and not p.name.endswith(".lock")
    }


def refused(result, *fragments: str) -> None:
    output = " ".join(result.output.split())
    assert result.exit_code not in (0, None) and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "error:" in output and "fix:" in output, result.output
    for fragment in fragments:
        assert fragment in output, (fragment, result.output)


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_seed) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    seed = make_seed("llama", root / "seed")
    code = root / "code.txt"
    code.write_text(domain_corpus("code", 300))
    assert cli("prepare", code, "--tokenizer", seed, "--out", root / "store").exit_code == 0
    assert cli("branch", seed, root / "run", "--domain", "code", "--copy").exit_code == 0
    assert cli("mix", root / "run").exit_code == 0
    return {"root": root, "seed": seed, "code": code, "store": root / "store", "run": root / "run"}


def _meta(store: Path) -> dict:
    return json.loads((store / "moekit-store.json").read_text())


def _write_meta(store: Path, meta) -> None:
    (store / "moekit-store.json").write_text(json.dumps(meta))


def _set(key, value):
    def change(store: Path) -> None:
        meta = _meta(store)
        meta[key] = value
        _write_meta(store, meta)

    return change


def _drop(key):
    def change(store: Path) -> None:
        meta = _meta(store)
        del meta[key]
        _write_meta(store, meta)

    return change


def _big_id_in_a_shard(store: Path) -> None:
    """A shard byte damaged into an id past the vocabulary, the metadata untouched."""
    shard = store / _meta(store)["shards"][0]["file"]
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[3] = 60000
    tokens.tofile(shard)


STORE_DAMAGE = {
    "missing shard": (lambda s: (s / _meta(s)["shards"][0]["file"]).unlink(), "is missing"),
    "missing documents.bin": (lambda s: (s / "documents.bin").unlink(), "documents.bin is missing"),
    "metadata not JSON": (lambda s: (s / "moekit-store.json").write_text("{oops"), "not a readable token store"),
    "metadata a list": (lambda s: _write_meta(s, [1, 2]), "not a JSON object"),
    "metadata without shards": (_drop("shards"), "lists no shards"),
    "bogus dtype": (_set("dtype", "float64"), "token type 'float64'"),
    "inflated token count": (lambda s: _set("tokens", _meta(s)["tokens"] + 1000)(s), "its metadata says"),
    "recorded id past the vocabulary": (_set("max_token_id", 99999), "beyond the"),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_a_damaged_store_is_answered(world, tmp_path, damage):
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    breaks, words = STORE_DAMAGE[damage]
    breaks(store)
    before = digest(tmp_path)
    result = cli("eval", world["seed"], "--data", f"code={store}", "--seq-len", "32")
    refused(result, words, str(store))
    assert digest(tmp_path) == before


def test_a_damaged_shard_byte_never_reaches_the_embedding(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    _big_id_in_a_shard(store)
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, symlinks=True)
    args = ["--branch", "code", "--data", store, "--seq-len", "32", "--batch-size", "64", "--max-steps", "2"]
    result = cli("train", run, *args, "--eval-every", "0", "--val-fraction", "0")
    refused(result, "token id 60000")
    eval_result = cli("eval", world["seed"], "--data", f"code={store}", "--seq-len", "32")
    refused(eval_result, "token id 60000")


def test_a_damaged_cached_store_is_prepared_again(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, symlinks=True)
    train = ["train", run, "--branch", "code", "--data", world["code"], "--seq-len", "32", "--max-steps", "1"]
    assert cli(*train).exit_code == 0
    (cached,) = (run / ".cache" / "tokens").iterdir()
    (cached / "documents.bin").unlink()
    result = cli(*train)
    assert result.exit_code == 0 and "Preparing it again" in result.output, result.output
    assert (cached / "documents.bin").is_file()


def test_prepare_with_a_tokenizerless_directory(world, tmp_path):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    shutil.copy(world["seed"] / "config.json", model)
    refused(cli("prepare", world["code"], "--tokenizer", model, "--out", tmp_path / "s"), "no tokenizer files")
    assert not (tmp_path / "s").exists()


def test_report_of_a_model_directory_says_so(world):
    refused(cli("report", world["run"] / "mixed"), "is a model directory", "not a run directory")


@pytest.mark.parametrize("command", ["report", "mix"])
def test_a_binary_manifest_is_answered(world, tmp_path, command):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run, symlinks=True)
    (run / "moekit.yaml").write_bytes(b"\xff\xfe\x00\x81binary")
    before = digest(tmp_path)
    refused(cli(command, run, *(["--out", tmp_path / "o"] if command == "mix" else [])), "Cannot read")
    assert digest(tmp_path) == before


def test_generate_on_corrupt_weights(world, tmp_path):
    model = tmp_path / "corrupt"
    shutil.copytree(world["run"] / "mixed", model)
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[8:40] = b"x" * 32  # the header's JSON
    weights.write_bytes(bytes(data))
    refused(cli("generate", model, "--prompt", "hi", "--raw"), "cannot load")


def test_generate_with_a_binary_prompt_file(world, tmp_path):
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(bytes(range(128, 256)))
    refused(cli("generate", world["run"] / "mixed", "--prompt-file", prompt, "--raw"), "not UTF-8 text")


def test_generate_json_under_a_file(world, tmp_path):
    result = cli("generate", world["run"] / "mixed", "--prompt", "hi", "--raw", "--json", world["code"] / "out.json")
    refused(result, "is not a directory")


def test_a_recipe_whose_seed_does_not_exist_fails_validation(world, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    spec = {
        "name": "r",
        "workdir": "w",
        "seed": {"path": "./missing-seed"},
        "domains": {"code": {"data": [str(world["code"])]}},
    }
    recipe.write_text(yaml.safe_dump({**spec, "stages": ["branch"]}))
    refused(cli("validate", recipe), "seed.path", "does not exist")


def test_the_disk_full_message_suggests_no_option_a_command_lacks():
    message, fix = environment_failure(OSError(errno.ENOSPC, "No space left on device", "/x"))
    assert "full" in message and "--out" not in fix
