"""Ablation routing rules (moekit.routing.modes): what each one selects and weights."""

import pytest
import torch

from moekit.routing import modes


def _logits(tokens: int = 64, experts: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))


def test_switch_drops_tokens_past_capacity():
    logits = torch.zeros(8, 4)
    logits[:, 2] = 5.0  # every token prefers expert 2
    routed = modes.switch(logits, "softmax", capacity_factor=1.0)  # capacity 8/4 = 2
    assert routed.indices.shape == (8, 1) and (routed.indices == 2).all()
    assert int((routed.weights > 0).sum()) == 2 and routed.stats["dropped"] == 6
    assert routed.weights[0, 0] == pytest.approx(
        torch.softmax(logits[0], -1)[2].item()
    )  # Switch keeps the raw probability


def test_soft_routing_weights_every_expert():
    routed = modes.soft(_logits(), "sigmoid")
    assert routed.indices.shape == (64, 4)
    torch.testing.assert_close(routed.weights.sum(-1), torch.ones(64))


def test_noisy_top_k_with_zero_noise_logits_has_std_softplus0():
    logits = _logits()
    routed = modes.noisy_top_k(logits, torch.zeros_like(logits), top_k=2, scoring="softmax", scale=1.0)
    assert routed.indices.shape == (64, 2) and routed.stats["noise_std"] == pytest.approx(0.6931, abs=1e-4)
    torch.testing.assert_close(routed.weights.sum(-1), torch.ones(64))
    quiet = modes.noisy_top_k(logits, torch.full_like(logits, -50.0), top_k=2, scoring="softmax", scale=1.0)
    assert torch.equal(quiet.indices.sort(-1).values, logits.topk(2).indices.sort(-1).values)  # no noise: plain top-k


def test_expert_choice_is_balanced_by_construction():
    logits = _logits(tokens=64, experts=4)
    logits[:, 0] += 10  # a skewed router cannot overload expert 0
    routed = modes.expert_choice(logits, "softmax", top_k=2, capacity_factor=1.0, scale=1.0)
    per_expert = routed.mask.sum(dim=0)
    assert per_expert.tolist() == [32, 32, 32, 32]  # capacity = 64 x 2 / 4
    assert routed.stats["capacity_use"] == 1.0 and routed.stats["experts_per_token"] == 2.0
    assert float((routed.weights * ~routed.mask).abs().sum()) == 0.0  # unchosen slots carry no weight
    chosen = routed.mask.any(-1)
    torch.testing.assert_close(routed.weights[chosen].sum(-1), torch.ones(int(chosen.sum())))
    assert routed.stats["dropped"] == float((~chosen).sum())


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    ids = torch.tensor([[5, 9, 5, 1000, 9]])
    routed = modes.hashed(ids, experts=4, top_k=2, scale=1.0)
    assert torch.equal(routed.indices[0], routed.indices[2]) and torch.equal(routed.indices[1], routed.indices[4])
    assert (routed.indices[:, 0] != routed.indices[:, 1]).all()  # distinct experts per token
    assert (routed.weights == 0.5).all()
    spread = modes.hashed(torch.arange(4000), experts=4, top_k=1, scale=1.0).indices.flatten().bincount(minlength=4)
    assert spread.min() > 800  # consecutive ids spread over all experts


def test_sample_top1_is_one_hot_forward_with_a_router_gradient():
    logits = _logits().requires_grad_()
    routed = modes.sample_top1(logits, temperature=0.5, scale=1.0)
    assert routed.indices.shape == (64, 1)
    torch.testing.assert_close(routed.weights.detach(), torch.ones(64, 1))  # forward: the sampled expert's output as is
    (routed.weights * torch.arange(64.0)[:, None]).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # straight-through: the router learns


def test_sample_top1_samples_the_router_softmax():
    logits = torch.zeros(2000, 3)
    logits[:, 1] = 3.0
    picks = modes.sample_top1(logits, temperature=1.0, scale=1.0).indices.flatten().bincount(minlength=3).float() / 2000
    expected = torch.softmax(torch.tensor([0.0, 3.0, 0.0]), -1)
    torch.testing.assert_close(
        picks, expected, atol=0.04, rtol=0
    )  # Gumbel-max samples softmax(logits); the temperature shapes only the gradient


@pytest.mark.parametrize("experts, top_k", [(4, 1), (4, 2), (8, 2), (16, 2), (64, 6)])
def test_sbase_balances_a_skewed_router_within_one_percent(experts, top_k):
    generator = torch.Generator().manual_seed(experts)
    tokens = 4096
    logits = torch.randn(tokens, experts, generator=generator) + torch.linspace(3, 0, experts)  # expert 0 favoured
    plain = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=experts).float()
    target = tokens * top_k / experts
    assert (plain / target - 1).abs().max() > 0.5  # the router alone is far from balanced
    routed = modes.sbase(logits, "softmax", top_k, 1.0)
    counts = torch.bincount(routed.indices.reshape(-1), minlength=experts).float()
    assert (counts / target - 1).abs().max() <= 0.01
    assert routed.stats["sbase_imbalance"] == pytest.approx(float((counts / target - 1).abs().max()))
    # gates: the raw softmax scores at the chosen experts, renormalised (not the balanced scores)
    expected = logits.softmax(dim=-1).gather(1, routed.indices)
    torch.testing.assert_close(routed.weights, expected / expected.sum(dim=-1, keepdim=True))


def test_sbase_selection_carries_no_gradient_but_the_gates_do():
    logits = (torch.randn(256, 4) + torch.tensor([2.0, 0, 0, 0])).requires_grad_()
    routed = modes.sbase(logits, "softmax", 2, 1.0)
    (routed.weights * torch.randn_like(routed.weights)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("experts, groups, kept, top_k", [(8, 4, 2, 2), (8, 2, 1, 2), (16, 4, 2, 4), (6, 3, 1, 2)])
def test_group_limited_top_k_equals_transformers_glm4_moe(experts, groups, kept, top_k):
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    config = Glm4MoeConfig(
        hidden_size=16, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=groups, topk_group=kept
    )
    router = Glm4MoeTopkRouter(config)
    generator = torch.Generator().manual_seed(experts * 100 + groups)
    with torch.no_grad():
        router.weight.normal_(0, 1.0, generator=generator)
        # negative biases included: a group masked to 0 instead of -inf would wrongly win against them
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=generator) - 1.0)
    hidden = torch.randn(512, 16, generator=generator)
    logits, _, theirs = router(hidden)
    biased = logits.sigmoid() + router.e_score_correction_bias
    ours = modes.group_limited_top_k(biased, top_k, groups, kept)
    assert torch.equal(ours.sort(dim=-1).values, theirs.sort(dim=-1).values)
    plain = biased.topk(top_k, dim=-1).indices  # the groups change some tokens' experts: the rule is exercised
    assert not torch.equal(plain.sort(dim=-1).values, theirs.sort(dim=-1).values)
