"""BTX at equal compute: FFN-only branch training, merge methods, FLOP counts, and the dense / upcycle baselines."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moekit.arch import get_adapter
from moekit.arch.base import LAYER_TENSOR
from moekit.cli import build_app
from moekit.io.checkpoint import Checkpoint
from moekit.manifest import load_manifest
from moekit.routing.control import find_routers
from moekit.steps.baselines import run_compute
from moekit.steps.branch import branch
from moekit.tiny import domain_corpus
from moekit.train.compute import model_compute
from tests.conftest import load

TRAIN = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _is_ffn(adapter, name: str) -> bool:
    match = LAYER_TENSOR.match(name)
    return bool(match) and adapter.is_ffn_tensor(match.group(2))


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def ffn_run(request, make_seed, tmp_path):
    """A run whose two branches were trained with --train ffn (tied embeddings, fp32 and bf16 seeds)."""
    dtype = request.param
    seed = make_seed("llama", dest=tmp_path / "seed", dtype=dtype, tie_word_embeddings=True)
    branch(str(seed), tmp_path / "run", ["code", "math"])
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 200))
        result = cli(
            "train",
            tmp_path / "run",
            "--branch",
            domain,
            "--data",
            tmp_path / f"{domain}.txt",
            "--train",
            "ffn",
            "--max-steps",
            "4",
            *TRAIN,
        )
        assert result.exit_code == 0, result.output
    return tmp_path


def test_ffn_only_training_keeps_every_other_tensor_bit_identical(ffn_run):
    seed = Checkpoint(ffn_run / "seed")
    adapter = get_adapter("llama")
    for domain in ("code", "math"):
        trained = Checkpoint(ffn_run / "run" / "branches" / domain)
        assert set(trained.tensors) == set(seed.tensors)
        changed = {name for name in seed.tensors if not torch.equal(trained.get(name), seed.get(name))}
        assert changed and all(_is_ffn(adapter, n) for n in changed), sorted(changed)
        assert all(trained.get(n).dtype == seed.get(n).dtype for n in seed.tensors)
    record = [s for s in load_manifest(ffn_run / "run").stages if s.stage == "train"][-1]
    assert record.params["train"] == "ffn" and record.outputs["flops"] > 0


def _force_expert(model: torch.nn.Module, expert: int) -> list:
    """Route every token of every layer to ``expert`` with gate weight 1 (forward hooks on the routers)."""

    def hook(module, inputs, output):
        logits = output[0]
        rows = logits.shape[0]
        return logits, torch.ones(rows, 1, dtype=output[1].dtype), torch.full((rows, 1), expert, dtype=output[2].dtype)

    return [router.register_forward_hook(hook) for _, router in find_routers(model)]


def test_mix_of_ffn_only_branches_reproduces_each_branch_on_its_expert(ffn_run):
    out = ffn_run / "mixed"
    result = cli("mix", ffn_run / "run", "--out", out, "--seed-as", "none", "--top-k", "1")
    assert result.exit_code == 0, result.output
    moe, seed = Checkpoint(out), Checkpoint(ffn_run / "seed")
    adapter = get_adapter("llama")
    for name in seed.tensors:  # nothing that diverged was averaged: the shared tensors are the seed's, bit for bit
        if not _is_ffn(adapter, name):
            assert torch.equal(moe.get(name), seed.get(name)), name
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    mixed = load(out)[0].float().eval()
    for expert, domain in enumerate(("code", "math")):
        dense = load(ffn_run / "run" / "branches" / domain)[0].float().eval()
        hooks = _force_expert(mixed, expert)
        with torch.no_grad():
            got, want = mixed(input_ids=ids).logits, dense(input_ids=ids).logits
        for handle in hooks:
            handle.remove()
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (expert, (got - want).abs().max())


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare"])
def test_merge_methods_on_shared_tensors(method, make_seed, tmp_path):
    """seed + merged deltas: task-arithmetic at scale 1 is the mean; TIES/DARE follow their definitions on one
    tensor."""
    seed = make_seed("llama", dest=tmp_path / "seed")
    branches = [make_seed("llama", dest=tmp_path / f"b{i}", seed=i) for i in (1, 2)]
    extra = {"task-arithmetic": [], "ties": ["--merge-density", "0.5"], "dare": ["--merge-density", "0.5"]}[method]
    out = tmp_path / "moe"
    result = cli(
        "mix",
        "--expert",
        f"a={branches[0]}",
        "--expert",
        f"b={branches[1]}",
        "--seed-model",
        seed,
        "--out",
        out,
        "--merge",
        method,
        *extra,
    )
    assert result.exit_code == 0, result.output
    name = "model.layers.0.self_attn.q_proj.weight"
    s, a, b = (Checkpoint(p).get(name) for p in (seed, *branches))
    got = Checkpoint(out).get(name)
    da, db = a - s, b - s
    if method == "task-arithmetic":
        assert torch.allclose(got, (a + b) / 2, atol=1e-6)
    elif method == "ties":

        def trim(d):
            keep = d.numel() // 2
            cut = d.abs().flatten().sort(descending=True).values[keep - 1]
            return torch.where(d.abs() >= cut, d, torch.zeros_like(d))

        ta, tb = trim(da), trim(db)
        sign = torch.sign(ta * 0.5 + tb * 0.5)
        agree_a, agree_b = (torch.sign(ta) == sign) & (ta != 0), (torch.sign(tb) == sign) & (tb != 0)
        num = torch.where(agree_a, ta * 0.5, 0.0) + torch.where(agree_b, tb * 0.5, 0.0)
        den = agree_a.float() * 0.5 + agree_b.float() * 0.5
        expected = s + torch.where(den > 0, num / den.clamp_min(1e-30), 0.0)
        assert torch.allclose(got, expected, atol=1e-6)
    # dare: every value is either the seed's plus a rescaled share of kept deltas; about half of each delta survives
    else:
        kept_share = ((got - s).abs() > 0).float().mean()
        assert 0.6 < kept_share < 0.9  # 1 - 0.5^2 of the values keep at least one delta
        # each kept delta is rescaled by 1/density = 2 and weighted 1/2: every merged value is the seed's plus
        # 0, da, db or da + db, exactly those (without the rescale it would be half of them)
        choices = torch.stack([torch.zeros_like(da), da, db, da + db])
        assert ((got - s)[None] - choices).abs().min(dim=0).values.max() < 1e-6
    assert yaml.safe_load((out / "moekit.yaml").read_text())["merge"]["method"] == method


def test_merge_options_are_checked():
    result = cli("mix", "--upcycle", "x", "--out", "y", "--merge", "ties")
    assert result.exit_code != 0 and "merge ties" in result.output
    result = cli("mix", "--expert", "a=x", "--seed-model", "x", "--out", "y", "--merge-density", "0.5")
    assert result.exit_code != 0 and "merge_density" in result.output


def test_flops_count_experts_by_top_k(make_seed, tmp_path):
    """An MoE of E copies of the seed FFN at top-k costs the dense FLOPs plus (k - 1) FFNs and the router, per token."""
    seed = make_seed("llama", dest=tmp_path / "seed")
    result = cli("mix", "--upcycle", seed, "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe")
    assert result.exit_code == 0, result.output
    dense, moe = model_compute(seed), model_compute(tmp_path / "moe")
    config = json.loads((seed / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    ffn, router = 3 * hidden * inter, 4 * hidden
    assert moe.active_params == dense.active_params + layers * (ffn + router)
    assert moe.total_params == dense.total_params + layers * (3 * ffn + router)
    heads = config["num_attention_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    assert dense.training_flops_per_token(64) == 3 * (2 * dense.active_params + 2 * layers * 64 * heads)


def test_dense_and_upcycle_baselines_match_btx_compute(tmp_path):
    """The recipe's dense stage trains on exactly the branches' + tune's tokens; upcycle spends BTX's FLOPs within
    5%."""
    stages = "stages=[seed, branch, train, mix, average, tune, dense, upcycle, eval]"
    result = cli("demo", "--tiny", "--out", tmp_path / "demo", stages, "train.max_steps=8", "tune.loop.max_steps=6")
    assert result.exit_code == 0, result.output
    run = tmp_path / "demo" / "run"
    spent = run_compute(run)
    manifest = load_manifest(run)
    branch_tokens = [s.outputs["tokens"] for s in manifest.stages if s.stage == "train"]
    tune_tokens = [s.outputs["tokens"] for s in manifest.stages if s.stage == "tune"][-1]
    assert len(branch_tokens) == 3 and spent["dense"].tokens == sum(branch_tokens) + tune_tokens
    assert abs(spent["upcycled"].flops / spent["tuned"].flops - 1) < 0.05
    report = json.loads((run / "eval.json").read_text())
    assert {"dense", "upcycled"} <= set(report["results"]) and report["compute"]["dense"]["tokens"] == spent[
        "tuned"
    ].tokens
    assert "│ dense" in result.output and "│ upcycled" in result.output and "FLOPs" in result.output
    upcycle = [s for s in manifest.stages if s.stage == "baseline:upcycle"][-1]
    assert upcycle.params["train"] == "all"
    config = json.loads((run / "upcycled" / "config.json").read_text())
    mixed = json.loads((run / "mixed" / "config.json").read_text())
    assert (
        config["num_local_experts"] == mixed["num_local_experts"]
        and config["num_experts_per_tok"] == mixed["num_experts_per_tok"]
    )
    assert not (run / ".upcycle-init").exists()
