"""``mix --add-expert``: a built MoE grows by one expert without changing what it had."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.overrides import TorchFunctionMode
from transformers import AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import GrowConfig, MixConfig
from moekit.data import load_token_blocks
from moekit.io.checkpoint import Checkpoint
from moekit.routing.control import find_routers
from moekit.steps.branch import add_branches, branch
from moekit.steps.mix import mix
from moekit.steps.mix.grow import add_expert
from moekit.tiny import domain_corpus
from tests.conftest import assert_added_expert_is_the_branch, assert_clean_load, load
from tests.e2e.test_centroid_router import _train_branch

runner = CliRunner()


class _NewExpertNeverChosen(TorchFunctionMode):
    """Push the last router logit (the added expert's) to -inf: the grown MoE must then be the old one."""

    def __init__(self, router_weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.ids = {id(w) for w in router_weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.ids:
            out = out.clone()
            out[..., -1] = float("-inf")
        return out


def _router_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [module.weight for _, module in find_routers(model)]  # every target's router holds its [E, H] weight


def _data(tmp_path: Path) -> dict[str, str]:
    files = {}
    for domain in ("code", "math", "prose"):
        files[domain] = tmp_path / f"{domain}.txt"
        files[domain].write_text(domain_corpus(domain, 200, seed=0))
    return {d: str(p) for d, p in files.items()}


def _bytes(checkpoint: Checkpoint, name: str) -> bytes:
    info = checkpoint.tensors[name]
    return checkpoint.array_rows(name, 0, info.shape[0]).tobytes()


@pytest.mark.parametrize(
    "family,target,dtype",
    [
        ("llama", "mixtral", "float32"),
        ("granite", "granitemoe", "float32"),
        ("qwen2", "qwen2_moe", "bfloat16"),
        ("llama", "glm4_moe", "float32"),
    ],
)
def test_grown_moe_keeps_the_old_one(make_seed, tmp_path, family, target, dtype):
    """New branch = the seed: old tensors byte-identical, and with the new row at -inf the old MoE's logits."""
    seed = make_seed(family, dtype=torch.bfloat16) if dtype == "bfloat16" else make_seed(family)
    data = _data(tmp_path)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    tokenizer = AutoTokenizer.from_pretrained(seed)
    for domain, path in run.branches.items():
        _train_branch(path, load_token_blocks(tokenizer, data[domain], 32), steps=3)
    mixed = mix(
        MixConfig(
            out=tmp_path / "run" / "mixed",
            seed=str(seed),
            experts=list(run.branches.items()),
            target=target,
            run_dir=run.run_dir,
        )
    ).out
    add_branches(str(seed), run.run_dir, ["prose"])
    _train_branch(run.run_dir / "branches" / "prose", load_token_blocks(tokenizer, data["prose"], 32), steps=3)
    result = add_expert(
        GrowConfig(
            into=mixed,
            name="prose",
            branch=run.run_dir / "branches" / "prose",
            out=tmp_path / "grown",
            router_data=data,
            router_tokens=512,
            router_block_size=32,
        )
    )
    assert result.experts == ["code", "math", "seed", "prose"]
    old, new, seed_ckpt = Checkpoint(mixed), Checkpoint(result.out), Checkpoint(seed)
    grown_names = set(new.tensors) - set(old.tensors)
    for name, info in old.tensors.items():
        if new.tensors[name].shape == info.shape:
            assert _bytes(new, name) == _bytes(old, name), name
        else:  # grown along the expert axis: the old experts' bytes come first
            assert new.tensors[name].shape[0] in (info.shape[0] + 1, 1), name
            old_bytes = _bytes(old, name)
            if new.tensors[name].shape[0] == info.shape[0] + 1:
                assert _bytes(new, name)[: len(old_bytes)] == old_bytes, name
    if grown_names:  # per-expert layouts: the new expert's tensors are new names
        assert all(".experts.3." in n for n in grown_names)
        assert len(grown_names) == 3 * seed_ckpt.config["num_hidden_layers"]
    assert_added_expert_is_the_branch(result.out, run.run_dir / "branches" / "prose")
    config = json.loads((result.out / "config.json").read_text())
    assert any(config.get(k) == 4 for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))
    record = yaml.safe_load((result.out / "moekit.yaml").read_text())
    assert (
        record["stage"] == "add-expert" and record["expert_names"][-1] == "prose" and record["input"]["stage"] == "mix"
    )
    assert "prose" in (result.out / "README.md").read_text()

    old_model, _ = load(mixed)
    grown_model, info = load(result.out)
    assert_clean_load(info)
    ids = load_token_blocks(tokenizer, data["code"], 32)[:4]
    with torch.no_grad():
        expected = old_model(input_ids=ids).logits
        with _NewExpertNeverChosen(_router_weights(grown_model)):
            masked = grown_model(input_ids=ids).logits
        free = grown_model(input_ids=ids).logits
    atol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(masked, expected, atol=atol, rtol=0)
    assert not torch.equal(free, masked) or result.router_stats["init_new_domain_top_k"] == 0  # the row is live


def test_add_expert_refusals(make_seed, tmp_path):
    """Wrong seed, a taken name, missing calibration data, and mixing options: clear errors, nothing written."""
    seed = make_seed("llama")
    other = make_seed("llama", hidden_size=48)
    data = _data(tmp_path)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    mix(
        MixConfig(
            out=tmp_path / "run" / "mixed", seed=str(seed), experts=list(run.branches.items()), run_dir=run.run_dir
        )
    )
    foreign = branch(str(other), tmp_path / "other", ["prose"])
    cases = [
        (
            [
                "mix",
                "--add-expert",
                f"prose={foreign.branches['prose']}",
                "--into",
                str(tmp_path / "run" / "mixed"),
                "--out",
                str(tmp_path / "g1"),
                "--router-data",
                f"prose={data['prose']}",
                "--router-data",
                f"code={data['code']}",
            ],
            "does not fit",
        ),
        (
            [
                "mix",
                "--add-expert",
                f"code={run.branches['code']}",
                "--into",
                str(tmp_path / "run" / "mixed"),
                "--out",
                str(tmp_path / "g2"),
            ],
            "already has an expert named 'code'",
        ),
        (
            [
                "mix",
                "--add-expert",
                f"prose={run.branches['code']}",
                "--into",
                str(tmp_path / "run" / "mixed"),
                "--out",
                str(tmp_path / "g3"),
                "--router-data",
                f"prose={data['prose']}",
            ],
            "at least one existing domain",
        ),
        (
            [
                "mix",
                "--add-expert",
                "prose=x",
                "--into",
                str(tmp_path / "run" / "mixed"),
                "--out",
                str(tmp_path / "g4"),
                "--top-k",
                "1",
            ],
            "--top-k do(es) not apply",
        ),
        (["mix", str(run.run_dir), "--add-expert", "prose"], "has no branch 'prose'"),
        (["branch", str(other), str(run.run_dir), "--domain", "prose", "--add"], "is not the seed of"),
        (["mix", "--add-expert", f"prose={seed}", "--into", str(seed), "--out", str(tmp_path / "g5")], "not an MoE"),
    ]
    for args, message in cases:
        result = runner.invoke(build_app(), args)
        assert result.exit_code != 0, args
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not any((tmp_path / f"g{i}").exists() for i in range(1, 6))
    assert not (run.run_dir / "branches" / "prose").exists()


def test_grow_a_run_through_the_cli(make_seed, tmp_path):
    """branch --add, train, mix RUN --add-expert, tune RUN/grown --train router, eval RUN: the added domain shows."""
    seed = make_seed("llama")
    data = _data(tmp_path)
    run = tmp_path / "run"
    loop = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3", "--eval-blocks", "2"]
    steps = [
        ["branch", str(seed), str(run), "--domain", "code", "--domain", "math"],
        ["train", str(run), "--data", f"code={data['code']}", "--data", f"math={data['math']}", *loop],
        ["mix", str(run)],
        ["tune", str(run), *loop],
        ["branch", str(seed), str(run), "--domain", "prose", "--add"],
        ["train", str(run), "--branch", "prose", "--data", f"prose={data['prose']}", *loop],
        ["mix", str(run), "--add-expert", "prose", "--router-tokens", "512", "--router-seq-len", "32"],
        ["tune", str(run / "grown"), "--train", "router", *loop],
        ["eval", str(run), "--max-tokens", "256", "--seq-len", "32", "--json", str(tmp_path / "eval.json")],
    ]
    for args in steps:
        result = runner.invoke(build_app(), args)
        assert result.exit_code == 0, (args, result.output)
    assert (run / "grown-tuned" / "config.json").is_file()
    record = yaml.safe_load((run / "grown" / "moekit.yaml").read_text())
    assert record["added"]["into"] == str((run / "tuned").absolute())  # a tuned MoE is grown by default
    assert record["input"]["tune"]["stage"] == "tune" and record["input"]["input"]["stage"] == "mix"
    assert_added_expert_is_the_branch(run / "grown", run / "branches" / "prose")
    tuned, grown = Checkpoint(run / "tuned"), Checkpoint(run / "grown")
    assert all(
        _bytes(grown, n) == _bytes(tuned, n) for n, i in tuned.tensors.items() if grown.tensors[n].shape == i.shape
    )
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["domains"] == ["code", "math", "prose"]
    assert {"mixed", "tuned", "grown", "grown-tuned"} <= set(report["results"])
    assert json.loads((run / "eval.json").read_text())["domains"] == [
        "code",
        "math",
        "prose",
    ]  # recorded for moekit report
    from moekit.manifest import load_manifest

    stages = [s.stage for s in load_manifest(run).stages]
    assert "add-expert" in stages and "tune:grown" in stages
    compute = report.get("compute", {})
    assert compute["grown"]["tokens"] == compute["tuned"]["tokens"] + compute["branch prose"]["tokens"]
    assert (
        compute["tuned"]["tokens"] == compute["mixed"]["tokens"] + 3 * 4 * 32
    )  # the prose branch is not in the mixed model
    assert compute["grown-tuned"]["tokens"] == compute["grown"]["tokens"] + 3 * 4 * 32
    page = tmp_path / "report.html"
    result = runner.invoke(build_app(), ["report", str(run), "--out", str(page), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "grown-tuned" in text and "<h3>prose</h3>" in text
    assert (
        'class="note"' not in text and (run / "inspect" / "routing.json").is_file()
    )  # routing inspected here, on the run's data
    assert text.count("data:image/png") >= 6


def test_tune_new_expert_and_router_only(make_seed, tmp_path):
    """--train new-expert+router: the added expert and the routers learn; every other expert stays bit for bit."""
    seed = make_seed("llama")
    data = _data(tmp_path)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    mixed = mix(
        MixConfig(
            out=tmp_path / "run" / "mixed", seed=str(seed), experts=list(run.branches.items()), run_dir=run.run_dir
        )
    ).out
    add_branches(str(seed), run.run_dir, ["prose"])
    grown = add_expert(
        GrowConfig(
            into=mixed,
            name="prose",
            branch=run.run_dir / "branches" / "prose",
            out=tmp_path / "grown",
            router_data=data,
            router_tokens=256,
            router_block_size=32,
        )
    ).out
    loop = [
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--eval-every",
        "0",
        "--lr",
        "1e-2",
        "--weight-decay",
        "0.1",
    ]
    result = runner.invoke(
        build_app(),
        [
            "tune",
            str(grown),
            "--train",
            "new-expert+router",
            "--data",
            f"prose={data['prose']}",
            "--out",
            str(tmp_path / "tuned"),
            *loop,
        ],
    )
    assert result.exit_code == 0, result.output
    before, after = Checkpoint(grown), Checkpoint(tmp_path / "tuned")
    changed = {n for n in before.tensors if _bytes(before, n) != _bytes(after, n)}
    layers = before.config["num_hidden_layers"]
    assert len(changed) == layers * 4  # per layer: the router and the new expert's three projections
    assert all(".gate." in n or ".experts.3." in n for n in changed), sorted(changed)
    refused = runner.invoke(
        build_app(),
        [
            "tune",
            str(mixed),
            "--train",
            "new-expert+router",
            "--data",
            f"prose={data['prose']}",
            "--out",
            str(tmp_path / "t2"),
            *loop,
        ],
    )
    assert refused.exit_code != 0 and "mix --add-expert" in refused.output and not (tmp_path / "t2").exists()
