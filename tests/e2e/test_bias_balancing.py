"""Loss-free balancing: ``tune --balance bias`` learns the selection bias the exported model routes with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit.config import LoopSettings, MixConfig, TuneConfig
from moekit.data.domains import domains_data
from moekit.errors import UnsupportedArchitectureError
from moekit.routing.bias import SelectionBias, find_selection_biases
from moekit.routing.control import RoutingController, find_routers
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.steps.tune import tune
from moekit.tiny import domain_corpus, perturb_model

DOMAINS = ("code", "math", "prose")


def _skewed_moe(make_seed, tmp_path: Path, target: str) -> Path:
    """A 4-expert top-2 MoE whose routers send nearly every token to expert 0.

    Each layer's router row 0 points along the mean router input (measured on code text), so
    expert 0's score is far above the others' for almost every token.
    """
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", list(DOMAINS))
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    for domain in DOMAINS:
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 300))
    moe = mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=list(run.branches.items()), target=target)).out
    model = AutoModelForCausalLM.from_pretrained(moe)
    inputs: dict[str, list[torch.Tensor]] = {}
    routers = find_routers(model)
    hooks = [
        r.register_forward_pre_hook(
            lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n, r in routers
    ]
    ids = AutoTokenizer.from_pretrained(moe)((tmp_path / "code.txt").read_text())["input_ids"][:256]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    path = next(moe.glob("*.safetensors"))
    state = load_file(path)
    for name, _ in routers:
        mean = torch.cat(inputs[name]).mean(dim=0)
        state[f"{name}.weight"][0] = 50 * mean / mean.norm()
    save_file(state, path, metadata={"format": "pt"})
    return moe


def _tune(moe: Path, out: Path, balance: str, steps: int = 60, **options) -> object:
    cfg = TuneConfig(
        model=moe,
        out=out,
        data={d: [str(moe.parent / f"{d}.txt")] for d in DOMAINS},
        train="router",
        balance=balance,
        aux_coef=0.0,
        loop=LoopSettings(max_steps=steps, seq_len=32, batch_size=8, lr=3e-3, eval_every=0, eval_blocks=8),
        **options,
    )
    return tune(cfg, show_progress=False), cfg


@pytest.fixture(scope="module")
def skewed_glm(make_seed, tmp_path_factory) -> Path:
    return _skewed_moe(make_seed, tmp_path_factory.mktemp("skewed"), "glm4_moe")


def test_bias_balancing_balances_a_skewed_router(skewed_glm, tmp_path):
    """The acceptance case: held-out MaxVio below 0.2 with the bias, above 0.5 without balancing."""
    plain, _ = _tune(skewed_glm, tmp_path / "plain", "none")
    balanced, _ = _tune(skewed_glm, tmp_path / "biased", "bias", bias_rate=0.02)
    assert plain.heldout_routing["maxvio_mean"] > 0.5, plain.heldout_routing
    assert balanced.heldout_routing["maxvio_mean"] < 0.2, balanced.heldout_routing
    assert balanced.last_row["bias_abs_max"] > 0.1  # the bias did the work, not the router weights alone


def test_the_saved_model_routes_held_out_tokens_as_the_final_eval_did(skewed_glm, tmp_path):
    """Reloaded in plain transformers, the tuned model makes exactly the choices the tune loop's final evaluation
    made."""
    result, cfg = _tune(skewed_glm, tmp_path / "tuned", "bias", steps=20, bias_rate=0.02)
    model = AutoModelForCausalLM.from_pretrained(cfg.out)
    tokenizer = AutoTokenizer.from_pretrained(cfg.out)
    domains = domains_data(tokenizer, cfg.data, {}, cfg.loop.seq_len, None, "text", tmp_path / "cache", None)
    controller = RoutingController(model)
    with torch.no_grad(), controller.counting() as counts:
        for domain in domains.values():
            blocks = domain.heldout.head(cfg.loop.eval_blocks)
            for batch in blocks.split(cfg.loop.batch_size):
                model(input_ids=batch.long())
    assert counts.tolist() == result.heldout_routing["counts"]
    saved_bias = SelectionBias(find_selection_biases(controller.routers), 0.0).values()
    assert saved_bias.abs().max() > 0.05  # the learned bias is in the checkpoint


def test_the_bias_changes_selection_but_not_gate_normalisation(skewed_glm, tmp_path):
    """Gate values are the unbiased sigmoid scores of the chosen experts, renormalised; the bias only picks them."""
    _, cfg = _tune(skewed_glm, tmp_path / "tuned", "bias", steps=20, bias_rate=0.02)
    model = AutoModelForCausalLM.from_pretrained(cfg.out)
    router = find_routers(model)[0][1]
    hidden = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        logits, weights, indices = router(hidden)
    scores = logits.sigmoid()
    assert torch.equal(
        indices.sort(dim=-1).values, (scores + router.e_score_correction_bias).topk(2).indices.sort(dim=-1).values
    )
    expected = scores.gather(1, indices)
    assert torch.allclose(weights, expected / expected.sum(dim=-1, keepdim=True), atol=1e-6)
    unbiased = scores.topk(2).indices.sort(dim=-1).values
    assert (unbiased != indices.sort(dim=-1).values).any()  # the bias does change which experts run


def test_the_update_follows_the_sign_rule(make_seed, tmp_path):
    """One update moves the bias by exactly u * sign(mean - count) of the step's counts (ERNIE's [1, E] bias)."""
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    moe = mix(
        MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target="ernie4_5_moe")
    ).out
    model = AutoModelForCausalLM.from_pretrained(moe)
    controller = RoutingController(model)
    biases = find_selection_biases(controller.routers)
    assert biases is not None and biases[0][0].endswith("moe_statics.e_score_correction_bias")
    bias = SelectionBias(biases, rate=0.25)
    bias.update(torch.tensor([[9.0, 1.0, 2.0], [2.0, 2.0, 2.0]]))
    assert bias.values().tolist() == [[-0.25, 0.25, 0.25], [0.0, 0.0, 0.0]]
    assert tuple(biases[0][1].shape) == (1, 3)


def test_the_optimiser_never_touches_the_bias(make_seed, tmp_path):
    """With every parameter training, the bias still moves only by the rule: after 2 steps it is a sum of two steps
    of -u, 0 or +u."""
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    (tmp_path / "code.txt").write_text(domain_corpus("code", 100))
    moe = mix(
        MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target="ernie4_5_moe")
    ).out
    cfg = TuneConfig(
        model=moe,
        out=tmp_path / "tuned",
        data={"code": [str(tmp_path / "code.txt")]},
        train="all",
        balance="bias",
        bias_rate=0.25,
        loop=LoopSettings(max_steps=2, seq_len=32, batch_size=4, lr=1e-2, eval_every=0, eval_blocks=1),
    )
    tune(cfg, show_progress=False)
    values = SelectionBias(
        find_selection_biases(RoutingController(AutoModelForCausalLM.from_pretrained(cfg.out)).routers), 0.0
    ).values()
    assert set(values.reshape(-1).tolist()) <= {-0.5, -0.25, 0.0, 0.25, 0.5}  # a count at the mean moves nothing


def test_bias_balancing_is_refused_without_a_selection_bias(make_seed, tmp_path):
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code"])
    (tmp_path / "code.txt").write_text(domain_corpus("code", 50))
    moe = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()))).out
    cfg = TuneConfig(
        model=moe,
        out=tmp_path / "tuned",
        data={"code": [str(tmp_path / "code.txt")]},
        balance="bias",
        loop=LoopSettings(max_steps=1, seq_len=32, batch_size=2),
    )
    with pytest.raises(UnsupportedArchitectureError, match="--target glm4_moe"):
        tune(cfg, show_progress=False)
    assert not (tmp_path / "tuned").exists()
