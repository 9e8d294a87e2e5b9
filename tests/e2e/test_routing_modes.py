"""Each ablation routing mode of ``tune``: it trains, reports its own metrics, and saves a plain model whose card
states its routing."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model
from tests.conftest import assert_clean_load, load

LOOP = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def mixed(make_seed, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("modes")
    seed = make_seed("llama", dest=tmp / "seed")
    run = branch(str(seed), tmp / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    for domain in ("code", "math"):
        (tmp / f"{domain}.txt").write_text(domain_corpus(domain, 200))
    return mix(MixConfig(out=tmp / "mixed", seed=str(seed), experts=list(run.branches.items()))).out


# mode -> (extra options, --train, metrics the mode must report)
MODES = {
    "noisy": ([], "router", {"noise_std"}),
    "expert_choice": (["--capacity-factor", "1.0"], "router", {"capacity_use", "experts_per_token", "dropped_tokens"}),
    "hash": ([], "all-but-experts", {"dropped_tokens"}),
    "sample_top1": (["--temperature", "2.0:0.5"], "router", {"temperature"}),
    "switch": (["--capacity-factor", "1.0"], "router", {"capacity_use", "dropped_tokens"}),
    "sbase": ([], "router", {"sbase_imbalance"}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_ablation_mode_trains_reports_and_saves_a_plain_model(mixed, tmp_path, mode):
    extra, train, expected = MODES[mode]
    out = tmp_path / mode
    data = ["--data", f"code={mixed.parent / 'code.txt'}", "--data", f"math={mixed.parent / 'math.txt'}"]
    result = cli(
        "tune", mixed, *data, "--routing", mode, *extra, "--train", train, "--max-steps", "3", "--out", out, *LOOP
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "maxvio" in r]
    assert len(steps) == 3 and expected <= set(steps[-1]), steps[-1]
    if mode == "expert_choice":
        assert steps[-1]["capacity_use"] == pytest.approx(1.0)  # every expert fills its capacity
        assert steps[-1]["maxvio"] == pytest.approx(0.0, abs=1e-6)  # balanced by construction
    if mode == "sample_top1":
        assert steps[0]["temperature"] > steps[-1]["temperature"] >= 0.5  # the schedule anneals
    if mode == "hash":
        assert steps[-1]["dropped_tokens"] == 0
    if mode == "sbase":  # 4 x 32 tokens, top-2 of 3 experts: balanced to the token; no balancing loss
        assert all(r["sbase_imbalance"] < 0.03 for r in steps) and not any(k.startswith("aux_loss") for k in steps[-1])
    assert set(Checkpoint(out).tensors) == set(
        Checkpoint(mixed).tensors
    )  # no training-only parameter (noise weights) saved
    _, info = load(out)
    assert_clean_load(info)
    card = (out / "README.md").read_text()
    assert "Routing at inference:" in card and f"`{mode}` routing was used only while training" in card
    record = yaml.safe_load((out / "moekit.yaml").read_text())["tune"]
    assert record["routing"] == mode and "top-2" in record["inference_routing"]
    assert (
        json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 2
    )  # the export keeps the configured routing


def test_router_jitter_trains_and_saves_the_same_tensors(mixed, tmp_path):
    out = tmp_path / "jitter"
    data = ["--data", f"code={mixed.parent / 'code.txt'}"]
    result = cli("tune", mixed, *data, "--router-jitter", "0.01", "--max-steps", "2", "--out", out, *LOOP)
    assert result.exit_code == 0, result.output
    assert set(Checkpoint(out).tensors) == set(Checkpoint(mixed).tensors)
    assert yaml.safe_load((out / "moekit.yaml").read_text())["tune"]["router_jitter"] == 0.01


@pytest.mark.parametrize(
    "options, message",
    [
        (["--routing", "sbase", "--balance", "switch"], "balances the experts by its Sinkhorn assignment"),
        (["--routing", "sbase", "--aux-coef", "0.01"], "balances the experts by its Sinkhorn assignment"),
        (["--routing", "sbase", "--balance", "bias"], "balances the experts by its Sinkhorn assignment"),
        (["--router-jitter", "0"], "router_jitter"),
        (["--router-jitter", "1"], "router_jitter"),
        (["--router-jitter", "-0.1"], "router_jitter"),
    ],
)
def test_bad_sbase_and_jitter_options_are_refused_and_write_nothing(mixed, tmp_path, options, message):
    out = tmp_path / "refused"
    data = ["--data", f"code={mixed.parent / 'code.txt'}", "--max-steps", "2"]
    result = cli("tune", mixed, *data, *options, "--out", out, *LOOP)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()
