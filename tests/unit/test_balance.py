"""Balancing losses, load metrics and the bias-balancing update."""

import math

import pytest
import torch

from moekit.routing import balance


def test_switch_loss_is_one_at_balance_and_higher_when_skewed():
    probs = torch.full((4,), 0.25)
    assert float(balance.switch_loss(torch.full((4,), 10.0), probs)) == pytest.approx(1.0)
    skewed = float(balance.switch_loss(torch.tensor([40.0, 0, 0, 0]), torch.tensor([0.7, 0.1, 0.1, 0.1])))
    assert skewed == pytest.approx(4 * 0.7)


def test_switch_loss_gradient_pushes_probability_away_from_the_overloaded_expert():
    logits = torch.zeros(4, requires_grad=True)
    balance.switch_loss(torch.tensor([30.0, 10, 0, 0]), logits.softmax(-1)).backward()
    assert logits.grad[0] > 0 and logits.grad[2] < 0  # descent lowers expert 0's logit, raises idle ones


def test_btx_loss_uses_gate_values():
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    indices = torch.tensor([[0, 1], [0, 2]])
    means = balance.sparse_gate_means(weights, indices, 3)
    assert torch.allclose(means, torch.tensor([0.55, 0.2, 0.25]))
    assert float(balance.btx_loss(means, torch.tensor([0.5, 0.25, 0.25]))) == pytest.approx(3 * (0.275 + 0.05 + 0.0625))


def test_z_loss():
    logits = torch.zeros(5, 4)
    assert float(balance.z_loss(logits)) == pytest.approx(math.log(4) ** 2)


def test_load_metrics_extremes():
    one = balance.load_metrics(torch.tensor([12.0, 0, 0, 0]))
    assert one["load_imbalance"] == 4 and one["maxvio"] == 3 and one["dead_experts"] == 3 and one["entropy"] == 0
    uniform = balance.load_metrics(torch.tensor([5.0, 5, 5, 5]))
    assert uniform["load_imbalance"] == 1 and uniform["maxvio"] == 0 and uniform["dead_experts"] == 0
    assert uniform["entropy"] == pytest.approx(math.log(4)) and uniform["effective_experts"] == pytest.approx(4)


@pytest.mark.parametrize("proportional", [True, False])
def test_bias_moves_towards_underloaded_experts(proportional):
    bias = torch.zeros(3)
    updated = balance.update_selection_bias(
        bias, torch.tensor([30.0, 10.0, 20.0]), rate=1e-3, proportional=proportional
    )
    assert updated[0] < 0 < updated[1] and updated[2] == 0  # over-loaded down, under-loaded up, at-mean unchanged
