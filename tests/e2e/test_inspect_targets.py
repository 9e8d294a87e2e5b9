"""``inspect`` on bias-bearing and shared-expert MoEs: stored bias values, selection vs gate views, shared-expert
share."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus

DOMAINS = ("code", "math", "prose")


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _glm_with_shared_seed(make_seed, tmp_path: Path) -> Path:
    """GLM-4.5 layout from a Llama seed: three identical domain experts, top-2, the seed as the shared expert."""
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", list(DOMAINS))
    cfg = MixConfig(
        out=tmp_path / "moe",
        seed=str(seed),
        experts=list(run.branches.items()),
        target="glm4_moe",
        seed_as="shared",
        top_k=2,
    )
    return mix(cfg).out


def _set_bias(moe: Path, values: list[float]) -> dict[int, list[float]]:
    tensors = load_file(moe / "model.safetensors")
    names = sorted(n for n in tensors if n.endswith("e_score_correction_bias"))
    assert names, "the glm4_moe target stores a selection bias per layer"
    written = {}
    for layer, name in enumerate(names):
        tensors[name] = torch.tensor(values, dtype=tensors[name].dtype) * (layer + 1)
        written[layer] = [v * (layer + 1) for v in values]
    (moe / "model.safetensors").unlink()
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
    return written


def _inspect(moe: Path, tmp_path: Path) -> tuple[dict, str]:
    files = []
    for domain in DOMAINS[:2]:
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 60, seed=5))
        files += ["--data", f"{domain}={tmp_path / f'{domain}.txt'}"]
    result = cli("inspect", moe, *files, "--seq-len", "32", "--json", tmp_path / "r.json", "--detail")
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "r.json").read_text()), result.output


def test_bias_values_and_selection_versus_gate_views(make_seed, tmp_path):
    moe = _glm_with_shared_seed(make_seed, tmp_path)
    written = _set_bias(moe, [5.0, 5.0, 0.0])  # sigmoid scores lie in (0, 1): experts 0 and 1 are always chosen
    report, output = _inspect(moe, tmp_path)
    static = report["static"]["selection_bias"]
    assert {int(k): v for k, v in static["per_layer"].items()} == written  # exact in fp32
    assert static["abs_max"] == pytest.approx(5.0 * len(written))
    assert "Selection bias" in output
    for index, layer in enumerate(report["routing"]["layers"]):
        assert layer["selection_bias"] == pytest.approx(written[index])
        assert layer["load_fraction"] == pytest.approx([0.5, 0.5, 0.0])  # selection: score + bias
        gates = layer["gate_fraction"]  # weights: the unbiased scores, renormalised over the chosen two
        assert gates[2] == 0.0 and sum(gates) == pytest.approx(1.0) and gates[0] != pytest.approx(0.5, abs=1e-4)
        assert 0.0 < layer["changed_by_bias"] <= 1.0  # tokens whose unbiased top-2 included expert 2
    assert report["routing"]["summary"]["changed_by_bias_mean"] > 0


def test_shared_expert_share_is_half_for_identical_branches(make_seed, tmp_path):
    # seed_as shared: shared expert = seed FFN x 0.5 and the routed experts (identical copies, gates summing to 1)
    # give FFN x 0.5, so both parts have the same norm for every token
    moe = _glm_with_shared_seed(make_seed, tmp_path)
    report, output = _inspect(moe, tmp_path)
    for layer in report["routing"]["layers"]:
        assert layer["shared_output_share"] == pytest.approx(0.5, abs=1e-4)
    assert report["routing"]["summary"]["shared_output_share_mean"] == pytest.approx(0.5, abs=1e-4)
    assert "shared expert" in output.lower()
    assert (
        report["static"]["experts"] == 3 and report["static"]["selection_bias"]["abs_max"] == 0.0
    )  # mix writes a zero bias
