"""Router initialisation numerics."""

import pytest
import torch

from moekit.routing.init import (
    centroid_router,
    mean_top1_probability,
    random_router,
    scale_for_sharpness,
)


def test_random_router_is_small_and_not_zero():
    router = random_router(8, 256, 0.02, torch.Generator().manual_seed(0))
    assert router.shape == (8, 256)
    assert 0.015 < float(router.std()) < 0.025
    assert len({tuple(row.tolist()) for row in router}) == 8  # no two experts tie


def test_random_router_refuses_zero_std():
    with pytest.raises(ValueError):
        random_router(4, 8, 0.0, torch.Generator())


@pytest.mark.parametrize("sharpness", [0.2, 0.5, 0.8])
def test_scale_hits_target_sharpness(sharpness):
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 16, generator=gen)
    inputs = torch.randn(500, 16, generator=gen) * 30
    scale = scale_for_sharpness(directions, inputs, sharpness)
    target = 0.25 + sharpness * 0.75
    assert mean_top1_probability(inputs @ (directions * scale).T) == pytest.approx(target, abs=1e-3)


def test_centroid_rows_are_centred_and_route_each_cluster_home():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=gen) * 5 + 10  # a shared offset that centring must remove
    tokens = torch.cat([c + torch.randn(200, 32, generator=gen) for c in centres])
    labels = torch.arange(3).repeat_interleave(200)
    means = torch.stack([tokens[labels == i].mean(0) for i in range(3)])
    router = centroid_router(means, tokens.mean(0), tokens, sharpness=0.5)
    assert torch.allclose(router.mean(0), torch.zeros(32), atol=1e-4)  # equal-size domains: rows sum to 0
    assert (torch.argmax(tokens @ router.T, dim=-1) == labels).float().mean() > 0.95
    top1 = mean_top1_probability(tokens @ router.T)
    assert 0.4 < top1 < 0.95  # neither uniform (1/3) nor saturated (1)
