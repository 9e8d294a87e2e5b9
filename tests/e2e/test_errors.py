"""Every bad input: a clear message, exit code 2, no traceback, nothing left on disk."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.tiny import build_tiny_model

runner = CliRunner()


def run_cli(*args: str):
    result = runner.invoke(build_app(), [str(a) for a in args])
    return result


def assert_user_error(result, *fragments: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "error:" in output
    for fragment in fragments:
        assert fragment in output.replace("\n", " "), output


@pytest.fixture()
def run_dir(make_seed, tmp_path) -> Path:
    seed = make_seed("llama")
    result = run_cli("branch", seed, tmp_path / "run", "--domain", "a", "--domain", "b", "--copy")
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def _no_leftovers(parent: Path, name: str = "mixed") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.unlink()
    path.write_text(json.dumps(config))


def test_shape_mismatch(run_dir, make_seed):
    other = run_dir / "branches" / "b"
    shutil.rmtree(other)
    make_seed("llama", dest=other, intermediate_size=96)
    assert_user_error(run_cli("mix", run_dir), "Branch 'b'", "intermediate_size")
    _no_leftovers(run_dir)


def test_vocab_mismatch(run_dir, make_seed):
    other = run_dir / "branches" / "b"
    shutil.rmtree(other)
    make_seed("llama", dest=other, vocab_size=640)
    assert_user_error(run_cli("mix", run_dir), "vocab_size: 512 vs 640")
    _no_leftovers(run_dir)


def test_tokenizer_mismatch(run_dir):
    other = run_dir / "branches" / "b"
    shutil.rmtree(other)
    build_tiny_model(other, "llama")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<pad>"', '"<PAD>"'))
    assert_user_error(run_cli("mix", run_dir), "different tokenizer")
    _no_leftovers(run_dir)


def test_architecture_mismatch(run_dir, make_seed):
    other = run_dir / "branches" / "b"
    shutil.rmtree(other)
    make_seed("mistral", dest=other)
    assert_user_error(run_cli("mix", run_dir), "mistral model but the seed is llama")
    _no_leftovers(run_dir)


def test_missing_safetensors(run_dir):
    (run_dir / "branches" / "b" / "model.safetensors").unlink()
    assert_user_error(run_cli("mix", run_dir), "no model.safetensors")
    _no_leftovers(run_dir)


def test_corrupt_safetensors(run_dir):
    path = run_dir / "branches" / "a" / "model.safetensors"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("mix", run_dir), "truncated")
    _no_leftovers(run_dir)


def test_existing_output_needs_force(run_dir):
    (run_dir / "mixed").mkdir()
    (run_dir / "mixed" / "keep.txt").write_text("precious")
    assert_user_error(run_cli("mix", run_dir), "already exists", "--force")
    assert (run_dir / "mixed" / "keep.txt").read_text() == "precious"
    # --force replaces only what moekit writes: a directory of other files is refused, not deleted
    assert_user_error(run_cli("mix", run_dir, "--force"), "not a model or run directory")
    assert (run_dir / "mixed" / "keep.txt").read_text() == "precious"
    (run_dir / "mixed").rename(run_dir / "elsewhere")
    assert run_cli("mix", run_dir).exit_code == 0
    result = run_cli("mix", run_dir, "--force")  # an earlier mix output is replaced
    assert result.exit_code == 0, result.output
    assert (run_dir / "mixed" / "config.json").is_file()


def test_unsupported_family(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    result = run_cli("mix", "--upcycle", tmp_path / "gpt2", "--out", tmp_path / "out")
    assert_user_error(result, "type 'gpt2'", "llama -> mixtral", "qwen3 -> qwen3_moe")
    _no_leftovers(tmp_path, "out")


def test_biases_refused(tmp_path):
    seed = build_tiny_model(tmp_path / "seed", "llama", attention_bias=True)
    assert_user_error(run_cli("mix", "--upcycle", seed, "--out", tmp_path / "out"), "attention_bias")
    _no_leftovers(tmp_path, "out")


def test_too_few_experts_for_top_k(run_dir):
    assert_user_error(run_cli("mix", run_dir, "--no-seed-expert", "--top-k", "3"), "2 expert(s) cannot serve top-3")
    _no_leftovers(run_dir)


def test_router_zeros_explained(run_dir):
    assert_user_error(run_cli("mix", run_dir, "--router", "zeros"), "ties")
    _no_leftovers(run_dir)


def test_centroid_without_data(run_dir):
    assert_user_error(run_cli("mix", run_dir, "--router", "centroid"), "missing: a, b")
    _no_leftovers(run_dir)


def test_bad_options(run_dir):
    assert_user_error(run_cli("mix", run_dir, "--average", "weighted:1"), "one weight per branch")
    assert_user_error(run_cli("mix", run_dir, "--average", "median"), "not understood")
    assert_user_error(run_cli("mix", run_dir, "--dtype", "int4"), "dtype")
    assert_user_error(run_cli("mix", run_dir, "--router-data", "nopath"), "NAME=PATH")
    assert_user_error(run_cli("mix"), "exactly one input")
    _no_leftovers(run_dir)


def test_branch_errors(make_seed, tmp_path):
    seed = make_seed("llama")
    assert_user_error(run_cli("branch", tmp_path / "nope", tmp_path / "run", "--domain", "a"), "not found")
    assert_user_error(run_cli("branch", seed, tmp_path / "run", "--domain", "a", "--domain", "a"), "repeat")
    assert_user_error(run_cli("branch", seed, tmp_path / "run", "--domain", "seed"), "not a valid branch name")
    assert_user_error(run_cli("branch", seed, tmp_path / "run", "--domain", "../x"), "not a valid branch name")
    assert not (tmp_path / "run").exists()


def test_newer_manifest_refused(run_dir):
    path = run_dir / "moekit.yaml"
    path.write_text(path.read_text().replace("manifest_version: 2", "manifest_version: 99"))
    assert_user_error(run_cli("mix", run_dir), "newer moekit")
    _no_leftovers(run_dir)


def test_options_that_would_be_ignored_are_refused(run_dir, tmp_path):
    assert_user_error(run_cli("mix", run_dir, "--drop-fraction", "0.5"), "--drop-fraction only applies with --upcycle")
    assert_user_error(run_cli("mix", run_dir, "--router-sharpness", "0.3"), "only applies with --router centroid")
    assert_user_error(run_cli("mix", run_dir, "--seed-model", run_dir), "only applies with --expert")
    assert_user_error(
        run_cli("mix", run_dir, "--router-data", f"a={tmp_path}"), "router_data is only used with router=centroid"
    )
    assert_user_error(run_cli("mix", run_dir, "--router-std", "1.0"), "router_std")
    _no_leftovers(run_dir)


def test_centroid_with_one_domain_explained(run_dir, make_seed, tmp_path):
    (tmp_path / "a.txt").write_text("def f(x):\n    return x\n" * 50)
    expert = f"a={run_dir / 'branches' / 'a'}"
    data = f"a={tmp_path / 'a.txt'}"
    result = run_cli(
        "mix",
        "--expert",
        expert,
        "--seed-model",
        make_seed("llama"),
        "--out",
        tmp_path / "out",
        "--router",
        "centroid",
        "--router-data",
        data,
    )
    assert_user_error(result, "at least two domains")
    _no_leftovers(tmp_path, "out")


def test_output_overlapping_inputs_refused(run_dir):
    assert_user_error(run_cli("mix", run_dir, "--out", run_dir, "--force"), "would destroy the run")
    assert_user_error(run_cli("mix", run_dir, "--out", run_dir / "branches" / "a" / "moe"), "overlaps the input")
    assert (run_dir / "moekit.yaml").is_file() and (run_dir / "branches" / "a" / "config.json").is_file()
