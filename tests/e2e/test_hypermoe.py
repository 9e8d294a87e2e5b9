"""``tune --hypermoe`` (HyperMoE, Zhao et al. 2024) in moekit's own family: step 0 is the MoE exactly, one adapter per
distinct selected set equals per-token adapters, experts stay frozen, the output reloads in plain transformers
(``trust_remote_code=True``) with moekit's logits, and eval / inspect / generate read it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model
from tests.conftest import crash_tune_at

LOOP = ["--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "0", "--eval-blocks", "2"]
SIZES = ["--hypermoe-embed-dim", "16", "--hypermoe-adapter-dim", "8", "--hypermoe-hyper-dim", "16"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def mixed(make_seed, tmp_path_factory) -> dict[str, Path]:
    """A moekit_moe MoE and a Mixtral of the same perturbed branches (3 experts, top-2), and code data."""
    root = tmp_path_factory.mktemp("hypermoe")
    seed = make_seed("llama", dest=root / "seed")
    run = branch(str(seed), root / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    (root / "code.txt").write_text(domain_corpus("code", 200))
    experts = list(run.branches.items())
    own = mix(MixConfig(out=root / "own", seed=str(seed), experts=experts, target="moekit_moe")).out
    mixtral = mix(MixConfig(out=root / "mixtral", seed=str(seed), experts=experts)).out
    return {"own": own, "mixtral": mixtral, "seed": seed, "data": root / "code.txt"}


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def test_step_zero_is_the_moe_and_sets_equal_per_token_adapters(mixed):
    model = AutoModelForCausalLM.from_pretrained(mixed["own"], dtype=torch.float32)
    with torch.no_grad():
        before = model(_ids()).logits
        model.enable_hypermoe(embed_dim=16, adapter_dim=8, hyper_dim=16)
        torch.testing.assert_close(model(_ids()).logits, before, atol=1e-6, rtol=0)  # the adapters start at zero
        for module in model.hypernet.modules():  # wake the zero heads up to compare the two computations
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.05)
        block = model.model.layers[0].mlp
        flat = torch.randn(64, model.config.hidden_size)
        _, _, indices = block.gate(flat)
        per_set = block._hyper_output(flat, indices)
        # the reference computation: every token generates its own adapter
        selected = torch.zeros(64, block.gate.num_experts, dtype=torch.bool).scatter_(1, indices, True)
        down, down_bias, up, up_bias = model.hypernet(block.hyper(selected), 0)
        inner = F.relu(torch.einsum("nah,nh->na", down, flat) + down_bias)
        per_token = torch.einsum("nha,na->nh", up, inner) + up_bias
        torch.testing.assert_close(per_set, per_token, atol=1e-5, rtol=1e-5)
        assert len(torch.unique(selected, dim=0)) <= 3  # C(3, 2) sets at most, against 64 per-token adapters


def test_tune_hypermoe_trains_its_modules_and_reloads_in_plain_transformers(mixed, tmp_path):
    out = tmp_path / "tuned"
    result = cli("tune", mixed["own"], "--data", f"code={mixed['data']}", "--hypermoe", *SIZES, "--max-steps", "3",
                 "--out", out, *LOOP)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["hypermoe"] == {"embed_dim": 16, "adapter_dim": 8, "hyper_dim": 16}
    assert "class MoekitHyperNetwork" in (out / "modeling_moekit_moe.py").read_text()
    record = (out / "moekit.yaml").read_text()
    assert "hypermoe:" in record and "train: hypermoe" in record
    assert "HyperMoE" in (out / "README.md").read_text()
    before, after = Checkpoint(mixed["own"]), Checkpoint(out)
    hyper = [name for name in after.tensors if name.startswith("hypernet.") or ".mlp.hyper." in name]
    assert hyper and set(after.tensors) == set(before.tensors) | set(hyper)
    for name in before.tensors:  # experts, attention, embeddings frozen; only the routers moved
        same = torch.equal(before.get(name), after.get(name))
        assert same != name.endswith("mlp.gate.weight"), name
    assert float(after.get("hypernet.up_weight.weight").abs().max()) > 0  # the adapter's output side learned
    # plain transformers in a fresh process (no moekit import): the shipped code, moekit's logits
    torch.save(_ids(), tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, "
        "output_loading_info=True, dtype=torch.float32)\n"
        "assert not any(info.values()), info\n"
        "assert 'moekit' not in sys.modules\n"
        "torch.save(model(torch.load(sys.argv[2])).logits.detach(), sys.argv[3])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, out, tmp_path / "ids.pt", tmp_path / "plain.pt"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "plain.pt"), ours(_ids()).logits, atol=1e-6, rtol=0)
    # the reading commands handle it
    data = ["--data", f"code={mixed['data']}"]
    assert cli("eval", out, *data, "--seq-len", "32", "--max-tokens", "128").exit_code == 0
    assert cli("inspect", out, *data, "--seq-len", "32", "--max-tokens", "128").exit_code == 0
    assert cli("generate", out, "--prompt", "def f", "--max-new-tokens", "4", "--raw").exit_code == 0


@pytest.mark.parametrize(
    "model, options, message",
    [
        ("mixtral", ["--hypermoe"], "needs a model of moekit's own family"),
        ("seed", ["--hypermoe"], "needs a model of moekit's own family"),
        ("own", ["--hypermoe", "--train", "router"], "train router would leave them untrained"),
        ("own", ["--hypermoe", "--shard", "fsdp"], "hypermoe is not supported with shard fsdp"),
        ("own", ["--hypermoe-embed-dim", "16"], "--hypermoe-* sizes only apply with --hypermoe"),
        ("own", ["--train", "hypermoe"], "--train hypermoe trains HyperMoE's modules"),
    ],
)
def test_bad_hypermoe_options_are_refused_and_write_nothing(mixed, tmp_path, model, options, message):
    out = tmp_path / "refused"
    result = cli("tune", mixed[model], "--data", f"code={mixed['data']}", *options, "--max-steps", "2", "--out", out,
                 *LOOP)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_hypermoe_resume_equals_an_uninterrupted_run(mixed, tmp_path, monkeypatch):
    args = ["tune", mixed["own"], "--data", f"code={mixed['data']}", "--hypermoe", *SIZES, "--max-steps", "4",
            "--save-every", "2", *LOOP]  # fmt: skip
    assert cli(*args, "--out", tmp_path / "straight").exit_code == 0
    crash_tune_at(monkeypatch, 3)
    assert cli(*args, "--out", tmp_path / "resumed").exit_code == 130
    monkeypatch.undo()
    result = cli(*args, "--out", tmp_path / "resumed", "--resume")
    assert result.exit_code == 0 and "resumed at step 2" in result.output, result.output
    straight, resumed = Checkpoint(tmp_path / "straight"), Checkpoint(tmp_path / "resumed")
    assert any(name.startswith("hypernet.") for name in straight.tensors)
    for name in straight.tensors:
        assert torch.equal(straight.get(name), resumed.get(name)), name
