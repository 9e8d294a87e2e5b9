"""``tune``: what trains, whether balancing balances, global-batch counts, resume, processes, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import LoopSettings, MixConfig
from moekit.data import packed_blocks, token_stream
from moekit.io.checkpoint import Checkpoint
from moekit.routing.control import RoutingController
from moekit.routing.objective import BalancedObjective, BalanceSettings
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model
from moekit.train.loop import LoopJob, make_loop_engine, run_loop
from moekit.train.schedule import BlockSchedule
from tests.conftest import assert_clean_load, crash_tune_at, load

LOOP = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def mixed(make_seed, tmp_path) -> Path:
    """A 3-expert Mixtral mixed from two perturbed branches, with domain data files next to it."""
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 200))
    return mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=list(run.branches.items()))).out


def _data_args(mixed: Path) -> list:
    return ["--data", f"code={mixed.parent / 'code.txt'}", "--data", f"math={mixed.parent / 'math.txt'}"]


def test_router_only_tuning_changes_only_routers(mixed, tmp_path):
    result = cli(
        "tune", mixed, *_data_args(mixed), "--train", "router", "--max-steps", "3", "--out", tmp_path / "tuned", *LOOP
    )
    assert result.exit_code == 0, result.output
    model, info = load(tmp_path / "tuned")
    assert_clean_load(info)
    before, after = Checkpoint(mixed), Checkpoint(tmp_path / "tuned")
    assert set(before.tensors) == set(after.tensors)  # same per-expert HF layout as mix writes
    changed = [n for n in before.tensors if not torch.equal(before.get(n), after.get(n))]
    assert changed and all(n.endswith("block_sparse_moe.gate.weight") for n in changed), changed
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert (
        config["num_experts_per_tok"] == 2 and "rope_theta" in config and config["torch_dtype"] == "float32"
    )  # portable keys kept
    rows = [r for r in _rows(tmp_path / "tuned" / "metrics.jsonl") if "loss" in r]
    assert {"lm_loss", "aux_loss/switch", "load_imbalance", "maxvio", "dead_experts", "dropped_tokens"} <= set(rows[-1])


def _skew_towards_expert_0(model_dir: Path, out: Path, blocks: torch.Tensor) -> Path:
    """Copy an MoE with its routers rewritten so almost every token picks expert 0."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    controller = RoutingController(model)
    inputs = {}
    hooks = [
        r.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, (_, r) in enumerate(controller.routers)
    ]
    with torch.no_grad():
        model(input_ids=blocks[:8].long())
        for layer, (_, router) in enumerate(controller.routers):
            mean = inputs[layer].mean(0)
            router.weight[0] = 4 * mean / mean.norm() ** 2  # expert 0's logit is ~4 for a typical token
    for hook in hooks:
        hook.remove()
    controller.remove()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_aux_loss_lowers_maxvio_of_a_skewed_router(mixed, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(mixed)
    blocks = packed_blocks(token_stream(tokenizer, mixed.parent / "code.txt"), 32, "code")
    skewed = _skew_towards_expert_0(mixed, tmp_path / "skewed", blocks)
    final = {}
    for coef in ("0", "0.5"):
        out = tmp_path / f"tuned-{coef}"
        args = ["--train", "router", "--aux-coef", coef, "--max-steps", "25", "--out", out, *LOOP, "--lr", "3e-2"]
        result = cli("tune", skewed, *_data_args(mixed), *args)
        assert result.exit_code == 0, result.output
        rows = [r for r in _rows(out / "metrics.jsonl") if "maxvio" in r]
        assert rows[0]["maxvio"] > 0.35  # starts skewed (with top-2 of 3 experts, MaxVio is at most 0.5)
        final[coef] = sum(r["maxvio"] for r in rows[-3:]) / 3
    assert final["0.5"] < 0.5 * final["0"], final


def test_global_batch_counts_are_the_sum_over_micro_batches(mixed):
    tokenizer = AutoTokenizer.from_pretrained(mixed)
    blocks = packed_blocks(token_stream(tokenizer, mixed.parent / "code.txt"), 32, "code")
    reference = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32)
    ref_controller = RoutingController(reference)
    schedule = BlockSchedule(len(blocks), 2, 3, 1, 0)
    expected = torch.zeros(2, 3)
    with torch.no_grad():
        for micro in range(3):  # step 0's three micro-batches, before any update
            ref_controller.clear()
            reference(input_ids=blocks[schedule.indices(0, micro, 0)].long())
            expected += ref_controller.counts()
    model = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32)
    objective = BalancedObjective(RoutingController(model), BalanceSettings("switch", 0.01, 0.0, "global"))
    seen = []

    def after_step(step, row):
        if step == 1:
            seen.append((objective.last_step_counts.clone(), list(objective.last_step_micro_counts)))

    settings = LoopSettings(seq_len=32, batch_size=2, grad_accum=3, max_steps=1, save_every=0, eval_every=0)
    job = LoopJob(
        model,
        blocks,
        {},
        settings,
        mixed.parent / "work",
        show_progress=False,
        compute_loss=objective,
        step_metrics=objective.step_metrics,
        on_step_end=after_step,
    )
    run_loop(job, make_loop_engine(settings))
    step_counts, micro_counts = seen[0]
    assert len(micro_counts) == 3
    assert torch.equal(step_counts, sum(micro_counts)) and torch.equal(step_counts, expected)
    assert step_counts.sum() == 3 * 2 * 32 * 2 * 2  # micro-batches x blocks x tokens x top-2 x layers


@pytest.mark.parametrize(("routing", "extra"), [("switch", ["--capacity-factor", "0.5"]), ("soft", [])])
def test_switch_and_soft_routing_train(mixed, tmp_path, routing, extra):
    out = tmp_path / routing
    result = cli(
        "tune", mixed, *_data_args(mixed), "--routing", routing, *extra, "--max-steps", "2", "--out", out, *LOOP
    )
    assert result.exit_code == 0, result.output
    last = [r for r in _rows(out / "metrics.jsonl") if "dropped_tokens" in r][-1]
    if routing == "switch":
        assert last["dropped_tokens"] > 0.3  # capacity 0.5 x fair share: at least half the tokens overflow
    else:
        assert last["dropped_tokens"] == 0 and last["load_imbalance"] == pytest.approx(
            1.0
        )  # all experts see every token
    assert (
        json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 2
    )  # export keeps the configured routing


def test_tune_resume_after_a_crash(mixed, tmp_path, monkeypatch):
    args = ["tune", mixed, *_data_args(mixed), "--max-steps", "6", "--save-every", "2", "--balance", "btx", *LOOP]
    assert cli(*args, "--out", tmp_path / "straight").exit_code == 0
    import moekit.steps.tune.run as tune_step

    real = tune_step.run_loop
    crash_tune_at(monkeypatch, 5)
    assert cli(*args, "--out", tmp_path / "resumed").exit_code == 130
    assert not (tmp_path / "resumed").exists()
    ran = []

    def counting(job, engine):  # the resumed job must run steps 5 and 6 only, not start over
        job.on_step_end = lambda step, row: ran.append(step)
        return real(job, engine)

    monkeypatch.setattr(tune_step, "run_loop", counting)
    result = cli(*args, "--out", tmp_path / "resumed", "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed at step 4" in result.output and ran == [5, 6]
    a, b = Checkpoint(tmp_path / "straight"), Checkpoint(tmp_path / "resumed")
    for name in a.tensors:
        assert torch.allclose(a.get(name), b.get(name), atol=1e-6), name


@pytest.mark.slow  # global balancing across processes is also covered, under FSDP2, by test_fsdp
def test_two_processes_match_one_with_global_balancing(mixed, tmp_path):
    common = [
        *map(str, _data_args(mixed)),
        "--max-steps",
        "4",
        "--balance-scope",
        "global",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--eval-every",
        "0",
    ]
    one = cli("tune", mixed, *common, "--batch-size", "4", "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "moekit",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, "tune", str(mixed), *common, "--batch-size", "2", "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [[r for r in _rows(tmp_path / d / "metrics.jsonl") if "maxvio" in r] for d in ("one", "two")]
    for a, b in zip(*rows):
        for key in ("loss", "aux_loss/switch", "maxvio", "load_imbalance"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (key, a, b)


def test_bad_inputs(mixed, make_seed, tmp_path):
    refused = cli(
        "tune", mixed, *_data_args(mixed), "--balance", "bias", "--max-steps", "1", "--out", tmp_path / "o", *LOOP
    )
    assert refused.exit_code == 2 and "e_score_correction_bias" in refused.output
    dense = cli("tune", make_seed("llama"), *_data_args(mixed), "--max-steps", "1", "--out", tmp_path / "o", *LOOP)
    assert dense.exit_code == 2 and "not a Mixture-of-Experts" in dense.output
    mismatch = cli(
        "tune",
        mixed,
        *_data_args(mixed),
        "--mix",
        "code=0.5,wiki=0.5",
        "--max-steps",
        "1",
        "--out",
        tmp_path / "o",
        *LOOP,
    )
    assert mismatch.exit_code == 2 and "name the same domains" in mismatch.output
    missing = cli(
        "tune", mixed, "--data", f"code={tmp_path / 'none.txt'}", "--max-steps", "1", "--out", tmp_path / "o", *LOOP
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("keep")
    exists = cli("tune", mixed, *_data_args(mixed), "--max-steps", "1", "--out", tmp_path / "o", *LOOP)
    assert exists.exit_code == 2 and "already exists" in exists.output and (tmp_path / "o" / "x").read_text() == "keep"
