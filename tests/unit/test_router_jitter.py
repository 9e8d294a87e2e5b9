"""Router jitter (Switch): only the router's input is multiplied by U(1-eps, 1+eps), and only while training."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from moekit.config import MixConfig
from moekit.routing.control import RoutingController, RoutingSettings, find_routers
from moekit.steps.branch import branch
from moekit.steps.mix import mix


def _inputs_seen(model: torch.nn.Module, jitter: float) -> dict[str, torch.Tensor]:
    """Layer 0's MoE block input, its router's input (after the jitter hook) and its experts' input, as [N, H]."""
    controller = RoutingController(model, settings=RoutingSettings(jitter=jitter))
    name, router = find_routers(model)[0]
    block = model.get_submodule(name.rsplit(".", 1)[0])
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str) -> Any:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            seen.setdefault(key, args[0].reshape(-1, args[0].shape[-1]).detach().clone())

        return hook

    handles = [
        block.register_forward_pre_hook(keep("block")),
        router.register_forward_pre_hook(keep("router")),  # registered after the jitter hook: sees its output
        block.experts.register_forward_pre_hook(keep("experts")),
    ]
    model(torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)))
    for handle in handles:
        handle.remove()
    controller.remove()
    return seen


def test_jitter_multiplies_only_the_routers_input_while_training(make_seed, tmp_path):
    seed = make_seed("llama", dest=tmp_path / "seed")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    moe_dir = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()))).out
    moe = AutoModelForCausalLM.from_pretrained(moe_dir)
    torch.manual_seed(0)
    moe.train()
    seen = _inputs_seen(moe, 0.1)
    ratio = seen["router"] / seen["block"]
    assert ratio.min() >= 0.9 - 1e-5 and ratio.max() <= 1.1 + 1e-5 and ratio.std() > 0.01  # U(0.9, 1.1) noise
    torch.testing.assert_close(seen["experts"], seen["block"], rtol=0, atol=0)  # the experts see clean input
    moe.eval()
    seen = _inputs_seen(moe, 0.1)
    torch.testing.assert_close(seen["router"], seen["block"], rtol=0, atol=0)  # nothing at inference
