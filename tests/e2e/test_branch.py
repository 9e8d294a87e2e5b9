"""``branch``: run directory layout, cheap copies, and the seed never modified."""

import json
import os

import pytest

from moekit.errors import InputNotFoundError
from moekit.io.files import sha256_files
from moekit.manifest import load_manifest
from moekit.steps.branch import branch
from moekit.tiny import perturb_model


def _files(model_dir):
    """Every file but tokenizer_config.json (which branch rewrites portable: tested below)."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "tokenizer_config.json")


def test_branch_writes_portable_tokenizer_config(make_seed, tmp_path):
    """A transformers-5 tokenizer class (TokenizersBackend) becomes PreTrainedTokenizerFast; the seed is untouched."""
    seed = make_seed("llama", dest=tmp_path / "seed")
    assert json.loads((seed / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    before = (seed / "tokenizer_config.json").read_text()
    result = branch(str(seed), tmp_path / "run", ["code"])
    config = json.loads((result.branches["code"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (seed / "tokenizer_config.json").read_text() == before
    from transformers import AutoTokenizer

    text = "def f(x):\n    return x + 1"
    assert (
        AutoTokenizer.from_pretrained(result.branches["code"])(text).input_ids
        == AutoTokenizer.from_pretrained(seed)(text).input_ids
    )


def test_branch_links_and_manifest(make_seed, tmp_path):
    seed = make_seed("llama", dest=tmp_path / "seed")
    before = sha256_files(_files(seed))
    result = branch(str(seed), tmp_path / "run", ["code", "math"])
    manifest = load_manifest(tmp_path / "run")
    assert list(manifest.branches) == ["code", "math"]
    assert manifest.seed.model_type == "llama" and manifest.seed.path == str(seed)
    assert manifest.stages[0].stage == "branch"
    for name, path in result.branches.items():
        assert path == tmp_path / "run" / "branches" / name
        assert {p.name for p in _files(path)} == {p.name for p in _files(seed)}
        if result.link_mode == "hardlink":
            assert os.stat(path / "model.safetensors").st_nlink == 3  # seed + two branches
    perturb_model(result.branches["code"], seed=1)  # stands in for training writing the branch
    assert sha256_files(_files(seed)) == before
    assert sha256_files(_files(result.branches["math"])) == before


def test_branch_copy_makes_independent_files(make_seed, tmp_path):
    seed = make_seed("llama", dest=tmp_path / "seed")
    result = branch(str(seed), tmp_path / "run", ["code"], copy=True)
    copied = result.branches["code"] / "model.safetensors"
    assert result.link_mode == "copy"
    assert os.stat(copied).st_nlink == 1
    assert copied.read_bytes() == (seed / "model.safetensors").read_bytes()


def test_hub_id_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputNotFoundError, match="could not be fetched"):
        branch("moekit-test/does-not-exist", tmp_path / "run", ["code"])
    assert not (tmp_path / "run").exists()
