"""The frictions of a first run (issue "Where users take the MoE next"), each answered; every test here failed on
the behaviour before the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _short_context_run(make_seed, tmp_path: Path) -> tuple[Path, Path]:
    seed = make_seed("llama", max_position_embeddings=64)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 200))
    return seed, run.run_dir


def test_a_default_seq_len_longer_than_the_context_becomes_the_context(make_seed, tmp_path):
    seed, run = _short_context_run(make_seed, tmp_path)
    data = ["--data", f"code={tmp_path / 'code.txt'}", "--data", f"math={tmp_path / 'math.txt'}"]
    loop = ["--max-steps", "1", "--batch-size", "2", "--eval-every", "0", "--eval-blocks", "1"]
    result = cli("train", run, *data, "--branch", "code", *loop)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "--seq-len defaults to 1024, longer than the context" in said and "using --seq-len 64" in said
    assert said.count("note:") == 1
    result = cli("eval", seed, *data, "--max-tokens", "256")
    assert result.exit_code == 0, result.output
    assert "using --seq-len 64" in " ".join(result.output.split())
    mixed = mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=[("code", run / "branches" / "code")]))
    result = cli("tune", mixed.out, *data, *loop, "--train", "router", "--out", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    result = cli("inspect", mixed.out, *data, "--max-tokens", "256")
    assert result.exit_code == 0, result.output
    # a value the user gave that is too long is still refused
    result = cli("train", run, *data, "--branch", "math", *loop, "--seq-len", "128")
    assert result.exit_code == 2 and "longer than the context" in " ".join(result.output.split())


def test_generate_prints_its_timing_on_stderr(make_seed, tmp_path):
    seed = make_seed("llama")
    done = subprocess.run(
        [sys.executable, "-m", "moekit", "generate", str(seed), "--prompt", "def f", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d+ tokens in [0-9.]+ s", done.stderr)
    assert "tokens in" not in done.stdout and done.stdout.strip()


def test_routing_that_takes_every_expert_is_said_and_bias_balancing_refused(make_seed, tmp_path):
    seed = make_seed("qwen3")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    result = cli("mix", run.run_dir, "--target", "glm4_moe", "--seed-as", "shared")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "Top-2 of 2 routed experts: every token takes every expert" in said and "--top-k 1" in said
    (tmp_path / "code.txt").write_text(domain_corpus("code", 100))
    result = cli(
        "tune", run.run_dir / "mixed", "--data", f"code={tmp_path / 'code.txt'}", "--balance", "bias",
        "--max-steps", "1", "--seq-len", "32", "--out", tmp_path / "tuned",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "selection bias changes no selection" in " ".join(result.output.split())
    assert not (tmp_path / "tuned").exists()


def test_the_run_page_shows_numbers_for_people():
    from moekit.report.run_page import _short

    cell = _short(
        {"eval_loss": {"code": 3.0414180755615234, "math": 1.2345678}, "flops": 3600875520.0, "tokens": 1234567}
    )
    assert "3.0414180755615234" not in cell and "code: 3.041" in cell and "math: 1.235" in cell
    assert "flops: 3.6 GFLOP" in cell and "tokens: 1,234,567" in cell
    assert cell.count("<br>") == 2  # one value per line


@pytest.fixture()
def moe_and_new_branch(make_seed, tmp_path) -> tuple[Path, Path]:
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math", "law"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    experts = [(n, p) for n, p in run.branches.items() if n != "law"]
    return mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=experts)).out, run.branches["law"]


def test_add_expert_without_calibration_data(moe_and_new_branch, tmp_path):
    moe, law = moe_and_new_branch
    grow = ["mix", "--add-expert", f"law={law}", "--into", moe]
    result = cli(*grow, "--out", tmp_path / "refused")
    assert result.exit_code == 2 and "--router mean" in " ".join(result.output.split())
    result = cli(*grow, "--out", tmp_path / "grown", "--router", "mean")
    assert result.exit_code == 0, result.output
    old, new = Checkpoint(moe), Checkpoint(tmp_path / "grown")
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(new.get(router)[:-1], old.get(router))
    assert torch.allclose(new.get(router)[-1], old.get(router).float().mean(dim=0).to(old.get(router).dtype))
    result = cli("mix", "--upcycle", moe, "--router", "mean", "--out", tmp_path / "nope")
    assert result.exit_code == 2 and "only applies with --add-expert" in " ".join(result.output.split())
