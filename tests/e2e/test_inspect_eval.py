"""``inspect`` and ``eval``: numbers that match hand-set routing and a reference computation."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.data import evaluation_blocks
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture()
def data(tmp_path) -> dict[str, Path]:
    files = {}
    for domain in ("code", "math"):
        files[domain] = tmp_path / f"{domain}.txt"
        files[domain].write_text(domain_corpus(domain, 80, seed=3))
    return files


def _moe(make_seed, tmp_path: Path, top_k: int, name: str) -> Path:
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / f"run-{name}", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    return mix(MixConfig(out=tmp_path / name, seed=str(seed), experts=list(run.branches.items()), top_k=top_k)).out


def _route_everything_to_expert_0(moe: Path) -> None:
    """Hand-set weights: embedding dim 0 dominates the residual stream and is positive for every
    token, and only router row 0 reads it, so expert 0 has the largest logit for every token."""
    tensors = load_file(moe / "model.safetensors")
    tensors["model.embed_tokens.weight"][:, 0] = 50.0
    for name in [n for n in tensors if n.endswith("block_sparse_moe.gate.weight")]:
        router = torch.zeros_like(tensors[name])
        router[0, 0] = 10.0
        tensors[name] = router
    (moe / "model.safetensors").unlink()
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})


def _args(data):
    return [a for d, p in data.items() for a in ("--data", f"{d}={p}")] + ["--seq-len", "32"]


def test_all_tokens_to_expert_0(make_seed, tmp_path, data):
    moe = _moe(make_seed, tmp_path, top_k=1, name="top1")
    _route_everything_to_expert_0(moe)
    result = cli(
        "inspect", moe, *_args(data), "--json", tmp_path / "r.json", "--plot", tmp_path / "plots", "--tokens", "code"
    )
    assert result.exit_code == 0, result.output
    assert "DEAD EXPERTS" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    routing = report["routing"]
    assert routing["experts"] == 3 and routing["expert_names"] == ["code", "math", "seed"]
    for layer in routing["layers"]:
        assert layer["load_fraction"] == [1.0, 0.0, 0.0]
        assert layer["dead_expert_ids"] == [1, 2] and layer["dead_experts"] == 2
        assert layer["maxvio"] == pytest.approx(3 - 1) and layer["entropy"] == 0
        for shares in layer["domain_matrix"].values():
            assert sum(shares) == pytest.approx(1.0)
    assert routing["in_domain_share"]["code"] == pytest.approx(1.0) and routing["in_domain_share"]["math"] == 0
    assert routing["domains"]["code"]["tokens"] > 0
    for name in ("load.png", "domains_mean.png", "domains_layer00.png", "report.html"):
        assert (tmp_path / "plots" / name).stat().st_size > 500, name
    assert "data:image/png;base64," in (tmp_path / "plots" / "report.html").read_text()


def test_uniform_assignment_and_json_roundtrip(make_seed, tmp_path, data):
    moe = _moe(make_seed, tmp_path, top_k=3, name="all")  # top-3 of 3: every expert sees every token
    result = cli("inspect", moe, *_args(data), "--json", tmp_path / "r.json", "--detail")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.json").read_text()
    report = json.loads(text)
    assert json.loads(json.dumps(report)) == report
    for layer in report["routing"]["layers"]:
        assert layer["load_imbalance"] == pytest.approx(1.0) and layer["maxvio"] == pytest.approx(0.0)
        assert layer["entropy"] == pytest.approx(math.log(3)) and layer["dead_experts"] == 0
        assert layer["coselection"][0][1] == layer["tokens_per_expert"][0]  # every token picks every pair
    static = report["static"]
    assert static["is_moe"] and static["active_params"] == static["total_params"]  # top-3 of 3: all active


def test_static_inspection_and_dense_models(make_seed, tmp_path, data):
    seed = make_seed("llama")
    upcycled = mix(MixConfig(out=tmp_path / "up", seed=str(seed), upcycle={"num_experts": 4})).out
    result = cli("inspect", upcycled, "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    static = json.loads((tmp_path / "s.json").read_text())["static"]
    assert static["experts"] == 4 and static["top_k"] == 2
    assert static["active_params"] < static["total_params"]
    assert static["per_layer"][0]["mean_expert_cosine"] == pytest.approx(1.0, abs=1e-5)  # copies of one FFN
    dense = cli("inspect", seed, *_args(data))
    assert dense.exit_code == 2 and "dense llama model" in dense.output and "parameters" in dense.output
    assert cli("inspect", seed).exit_code == 0


def test_inspect_bad_inputs(make_seed, tmp_path, data):
    moe = _moe(make_seed, tmp_path, top_k=2, name="moe")
    missing = cli("inspect", moe, "--data", f"code={tmp_path / 'nope.txt'}")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    unknown = cli("inspect", moe, *_args(data), "--tokens", "physics")
    assert unknown.exit_code == 2 and "physics" in unknown.output


def test_eval_matches_transformers_reference(make_seed, tmp_path, data):
    moe = _moe(make_seed, tmp_path, top_k=2, name="moe")
    seed = make_seed("llama")
    result = cli("eval", seed, moe, *_args(data), "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(moe)
    labels = {Path(path): label for label, path in report["models"].items()}
    for path in (seed, moe):
        label = labels[Path(path).absolute()]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for domain, file in data.items():
            blocks = evaluation_blocks(tokenizer, [str(file)], 32, 65536)
            with torch.no_grad():
                reference = sum(
                    float(model(input_ids=b[None].long(), labels=b[None].long()).loss) for b in blocks
                ) / len(blocks)
            assert report["results"][label][domain]["loss"] == pytest.approx(reference, rel=1e-5)
    assert report["best"]["average"] in labels.values() and all("average" in r for r in report["results"].values())


def test_eval_needs_data(make_seed):
    result = cli("eval", make_seed("llama"))
    assert result.exit_code == 2 and "No evaluation data" in result.output
