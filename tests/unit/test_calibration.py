"""Layer-by-layer calibration computes the hidden states the model itself computes (eval mode, real attention mask)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moekit.io.checkpoint import Checkpoint
from moekit.routing.calibration import LayerwiseCalibrator


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("mistral", dict(sliding_window=8, attention_dropout=0.5)),  # every layer slides
        (
            "qwen2",
            dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, attention_dropout=0.5),
        ),  # some layers slide
        ("llama", dict(attention_dropout=0.5)),
    ],
)
def test_calibration_matches_the_models_own_mlp_inputs(family, overrides, make_seed):
    seed = make_seed(family, **overrides)
    config = AutoConfig.from_pretrained(seed)
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32).eval()
    ids = torch.randint(
        0, config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0)
    )  # longer than the window
    captured: list[torch.Tensor] = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()

    checkpoint = Checkpoint(seed)
    calibrator = LayerwiseCalibrator(config, checkpoint.get("model.embed_tokens.weight"), {"d": ids})
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        state = {n.removeprefix(prefix): checkpoint.get(n).float() for n in checkpoint.tensors if n.startswith(prefix)}
        mlp_inputs = calibrator.run_layer(layer, state)["d"]
        torch.testing.assert_close(mlp_inputs, captured[layer], atol=1e-5, rtol=1e-5)
