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
