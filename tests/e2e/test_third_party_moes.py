"""MoEs that moekit did not build: inspect, eval and tune them in both on-disk layouts.

Other tools write the same model either per expert (the hub layout) or with transformers 5's
fused ``experts.gate_up_proj``/``down_proj`` tensors (``save_pretrained(save_original_format=
False)``, some merging tools). Both must give the same static statistics, the same routing and
the same held-out loss; tuning reads either and writes the hub layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.arch import layouts_for_moe
from moekit.cli import build_app
from moekit.inspection.static import static_report
from moekit.io.checkpoint import Checkpoint
from moekit.tiny import THIRD_PARTY_MOE_TYPES, build_tiny_moe, domain_corpus
from tests.conftest import assert_clean_load, load


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def moes(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """Each third-party family, saved per expert (False) and fused (True), from the same weights."""
    root = tmp_path_factory.mktemp("third-party")
    return {
        (t, fused): build_tiny_moe(root / f"{t}-{'fused' if fused else 'per-expert'}", t, fused)
        for t in THIRD_PARTY_MOE_TYPES
        for fused in (False, True)
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    files = {d: root / f"{d}.txt" for d in ("code", "math")}
    for domain, path in files.items():
        path.write_text(domain_corpus(domain, 120, seed=5))
    return files


def _data_args(data: dict[str, Path]) -> list[str]:
    return [a for d, p in data.items() for a in ("--data", f"{d}={p}")]


@pytest.mark.parametrize("moe_type", THIRD_PARTY_MOE_TYPES)
def test_both_layouts_give_the_same_static_statistics(moe_type, moes):
    hub, fused = (static_report(Checkpoint(moes[(moe_type, f)])) for f in (False, True))
    assert fused["expert_layout"] == "fused" and hub["expert_layout"] in ("per-expert", "stacked")
    assert hub["total_params"] == fused["total_params"] and hub["active_params"] == fused["active_params"]
    for a, b in zip(hub["per_layer"], fused["per_layer"], strict=True):
        assert a["router_row_norms"] == b["router_row_norms"]
        torch.testing.assert_close(
            torch.tensor(a["expert_cosine"]), torch.tensor(b["expert_cosine"]), atol=1e-12, rtol=0
        )
        assert a["expert_params"] == b["expert_params"]


@pytest.mark.parametrize("moe_type", THIRD_PARTY_MOE_TYPES)
def test_routing_and_eval_agree_across_layouts(moe_type, moes, data, tmp_path):
    reports, evals = [], []
    for fused in (False, True):
        out = tmp_path / f"{fused}.json"
        result = cli(
            "inspect",
            moes[(moe_type, fused)],
            *_data_args(data),
            "--seq-len",
            "32",
            "--max-tokens",
            "256",
            "--json",
            out,
        )
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.read_text())["routing"])
        out = tmp_path / f"eval-{fused}.json"
        result = cli(
            "eval", moes[(moe_type, fused)], *_data_args(data), "--seq-len", "32", "--max-tokens", "256", "--json", out
        )
        assert result.exit_code == 0, result.output
        evals.append(next(iter(json.loads(out.read_text())["results"].values())))
    assert reports[0]["domains"] == reports[1]["domains"]
    for hub_layer, fused_layer in zip(reports[0]["layers"], reports[1]["layers"], strict=True):  # the same routing
        assert hub_layer["tokens_per_expert"] == fused_layer["tokens_per_expert"]
        assert hub_layer["domain_matrix"] == fused_layer["domain_matrix"]
    for domain in data:
        assert evals[0][domain]["loss"] == pytest.approx(evals[1][domain]["loss"], abs=1e-6)


@pytest.mark.parametrize("moe_type", THIRD_PARTY_MOE_TYPES)
def test_router_only_tune_reads_either_layout_and_writes_the_hub_layout(moe_type, moes, data, tmp_path):
    hub = Checkpoint(moes[(moe_type, False)])
    for fused in (False, True):
        out = tmp_path / f"tuned-{fused}"
        loop = [
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
            "--eval-blocks",
            "1",
        ]
        result = cli("tune", moes[(moe_type, fused)], *_data_args(data), "--train", "router", "--out", out, *loop)
        assert result.exit_code == 0, result.output
        _, info = load(out)
        assert_clean_load(info)
        tuned = Checkpoint(out)
        assert set(tuned.tensors) == set(hub.tensors)  # written in the hub layout, whatever the input's
        changed = [n for n in hub.tensors if not torch.equal(hub.get(n), tuned.get(n))]
        layout = layouts_for_moe(moe_type).detect(hub.tensors)
        routers = {layout.router_name(layer) for layer in layout.moe_layers(hub.tensors)}
        assert changed and set(changed) <= routers, changed  # only the routers' weights learned


def test_tune_loss_ignores_the_models_own_router_aux_loss(moes):
    """A third-party config with output_router_logits: true makes transformers add its aux loss to .loss;
    tune's lm_loss must be the plain next-token loss (its own balancing terms are added separately)."""
    from transformers import AutoModelForCausalLM

    from moekit.routing.control import RoutingController
    from moekit.routing.objective import BalancedObjective, BalanceSettings

    model = AutoModelForCausalLM.from_pretrained(
        moes[("mixtral", False)], dtype=torch.float32, output_router_logits=True, router_aux_loss_coef=5.0
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_aux = model(input_ids=ids, labels=ids).loss
        logits = model(input_ids=ids).logits
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(with_aux - plain) > 1.0  # transformers' .loss includes 5 x its aux loss
    objective = BalancedObjective(RoutingController(model), BalanceSettings(kind="none"))
    with torch.no_grad():
        total, _ = objective(model, ids)
    torch.testing.assert_close(total, plain, atol=1e-5, rtol=1e-5)


def test_dense_first_layers_are_reported_as_such(moes, data, tmp_path):
    """GLM-4.5 keeps its first ``first_k_dense_replace`` layers dense: the statistics and routing name the real
    decoder layers."""
    static = static_report(Checkpoint(moes[("glm4_moe", False)]))
    assert static["dense_layers"] == [0] and [layer["layer"] for layer in static["per_layer"]] == [1]
    assert static["selection_bias"]["per_layer"] == {"1": [0.0, 0.0, 0.0]}
    out = tmp_path / "r.json"
    assert (
        cli(
            "inspect",
            moes[("glm4_moe", True)],
            *_data_args(data),
            "--seq-len",
            "32",
            "--max-tokens",
            "256",
            "--json",
            out,
        ).exit_code
        == 0
    )
    routing = json.loads(out.read_text())["routing"]
    assert [layer["layer"] for layer in routing["layers"]] == [1] and "shared_output_share" in routing["layers"][0]
