"""Group-limited routing (``mix --groups G --topk-groups M``, DeepSeek-V3's rule in GLM-4.5's router): written into
the config, kept by tune, honoured by inspect; bad group counts refused with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.tiny import domain_corpus, perturb_model
from tests.conftest import assert_clean_load, load

LOOP = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(make_seed, tmp_path_factory) -> Path:
    """A run with 3 branches: with the seed expert, 4 routed experts (2 groups of 2)."""
    root = tmp_path_factory.mktemp("groups")
    seed = make_seed("llama", dest=root / "seed")
    for domain in ("code", "math", "prose"):
        (root / f"{domain}.txt").write_text(domain_corpus(domain, 200))
    args = [a for d in ("code", "math", "prose") for a in ("--domain", d)]
    assert cli("branch", seed, root / "run", *args).exit_code == 0
    return root / "run"


def test_groups_are_written_and_identical_branches_still_equal_the_seed(run_dir, tmp_path):
    out = tmp_path / "grouped"
    result = cli("mix", run_dir, "--target", "glm4_moe", "--groups", "2", "--topk-groups", "1", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (2, 1, 4)
    moe, info = load(out)
    assert_clean_load(info)
    dense, _ = load(run_dir.parent / "seed")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_tune_keeps_and_inspect_honours_the_groups(run_dir, tmp_path):
    mixed = tmp_path / "grouped"
    assert (
        cli("mix", run_dir, "--target", "glm4_moe", "--groups", "2", "--topk-groups", "1", "--out", mixed).exit_code
        == 0
    )
    perturb_model(mixed, seed=3, scale=0.05)  # experts that differ, so the routing matters
    tuned = tmp_path / "tuned"
    data = ["--data", f"code={run_dir.parent / 'code.txt'}", "--data", f"math={run_dir.parent / 'math.txt'}"]
    result = cli("tune", mixed, *data, "--balance", "bias", "--bias-rate", "0.05", "--out", tuned, *LOOP)
    assert result.exit_code == 0, result.output
    assert json.loads((tuned / "config.json").read_text())["n_group"] == 2
    report = tmp_path / "inspect.json"
    result = cli("inspect", tuned, *data, "--seq-len", "32", "--max-tokens", "256", "--json", report)
    assert result.exit_code == 0, result.output
    # with one group of 2 kept, top-2 takes both experts of the best group: the pairs (0,1) and (2,3) only
    layers = json.loads(report.read_text())["routing"]["layers"]
    coselection = torch.tensor([layer["coselection"] for layer in layers])
    cross = coselection[:, :2, 2:].sum() + coselection[:, 2:, :2].sum()
    assert float(coselection.sum()) > 0 and float(cross) == 0.0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--groups", "2", "--topk-groups", "1"], "mixtral has no group-limited routing"),
        (["--target", "glm4_moe", "--groups", "3", "--topk-groups", "1"], "cannot split 4 routed experts"),
        (["--target", "glm4_moe", "--groups", "4", "--topk-groups", "1"], "cannot split 4 routed experts"),
        (["--target", "glm4_moe", "--groups", "2", "--topk-groups", "3"], "more than the 2 groups"),
        (["--target", "glm4_moe", "--groups", "2"], "needs both groups and topk_groups"),
        (["--target", "glm4_moe", "--groups", "2", "--topk-groups", "1", "--top-k", "3"], "cannot be chosen from 1"),
    ],
)
def test_bad_groups_are_refused_and_nothing_is_written(run_dir, tmp_path, options, message):
    out = tmp_path / "refused"
    result = cli("mix", run_dir, *options, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_a_grouped_moe_does_not_grow_by_one_expert(run_dir, tmp_path):
    mixed = tmp_path / "grouped"
    assert (
        cli("mix", run_dir, "--target", "glm4_moe", "--groups", "2", "--topk-groups", "1", "--out", mixed).exit_code
        == 0
    )
    out = tmp_path / "grown"
    seed = run_dir.parent / "seed"
    result = cli("mix", "--add-expert", f"law={seed}", "--into", mixed, "--router", "mean", "--out", out)
    assert result.exit_code == 2, result.output
    assert "routes within 2 expert groups" in " ".join(result.output.split()) and not out.exists()
