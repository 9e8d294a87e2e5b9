"""Layer-by-layer forward passes over calibration tokens, without building the whole model.

``centroid`` router initialisation needs, for every layer, the hidden states that enter the MoE
block for each domain's tokens. Building the whole model would break mix's promise of memory
flat in model size, so this runs the *averaged dense* model one decoder layer at a time, the way
layer-wise quantisers calibrate: the model skeleton lives on the meta device (no memory), each
layer is given its real tensors just before it runs and dropped right after. Only the
calibration hidden states ([tokens, hidden] per domain) persist between layers.

The inputs of the next layer come from the averaged dense FFN, not from the MoE block being
built; with equal branches the two agree exactly and in general they differ only by how much
the experts disagree.

The layers run as the model runs at inference: in eval mode (no dropout, so identical runs give
identical routers) and with the attention the model itself uses, a sliding-window causal mask
for layers with sliding attention (``layer_types``, or a ``sliding_window`` for every layer)
when the calibration sequences are longer than the window.
"""

from __future__ import annotations

from typing import Any

import torch


class LayerwiseCalibrator:
    """Push token blocks through a dense model one decoder layer at a time."""

    def __init__(
        self,
        dense_config: Any,
        embed_weight: torch.Tensor,
        blocks: dict[str, torch.Tensor],
        batch: int = 8,
        device: torch.device | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        config = dense_config.__class__.from_dict(dense_config.to_dict())
        config.dtype = torch.float32
        config._attn_implementation = "sdpa"  # no mask needed: sdpa is causal when mask is None
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.skeleton.eval()  # no dropout: the hidden states the model produces at inference
        self.config = config
        self.device = device or torch.device("cpu")  # fp32 on whichever device: one layer's weights at a time
        self.rotary = type(self.skeleton.model.rotary_emb)(config=config).to(self.device)
        self.batch = batch
        self.capture_attention = False  # also keep each domain's attention inputs (attention-expert routers)
        self.attention_inputs: dict[str, torch.Tensor] = {}
        embed = embed_weight.float().to(self.device)
        self.hidden = {
            domain: torch.nn.functional.embedding(ids.to(self.device), embed) for domain, ids in blocks.items()
        }

    def run_layer(self, layer: int, layer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run layer ``layer`` (tensors named as inside the layer, fp32) on every domain.

        Returns each domain's MLP inputs flattened to [tokens, hidden] and advances the hidden
        states to the layer's output. With ``capture_attention``, each domain's attention inputs
        are kept in ``attention_inputs`` the same way.
        """
        module = self.skeleton.model.layers[layer]
        module.load_state_dict({k: v.to(self.device) for k, v in layer_state.items()}, strict=True, assign=True)
        captured: list[torch.Tensor] = []
        attended: list[torch.Tensor] = []
        hooks = [module.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))]
        if self.capture_attention:
            hooks.append(
                module.self_attn.register_forward_pre_hook(
                    lambda _m, args, kwargs: attended.append((args[0] if args else kwargs["hidden_states"]).detach()),
                    with_kwargs=True,
                )
            )
        mlp_inputs: dict[str, torch.Tensor] = {}
        self.attention_inputs = {}
        try:
            with torch.no_grad():
                for domain, hidden in self.hidden.items():
                    mask = self.attention_mask(layer, hidden.shape[1])
                    outputs = [self._forward(module, chunk, mask) for chunk in hidden.split(self.batch)]
                    self.hidden[domain] = torch.cat(outputs)
                    mlp_inputs[domain] = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
                    if attended:
                        self.attention_inputs[domain] = torch.cat([c.reshape(-1, c.shape[-1]) for c in attended])
                    captured.clear()
                    attended.clear()
        finally:
            for hook in hooks:
                hook.remove()
            module.to("meta")  # release the layer's weights
        return mlp_inputs

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: full causal attention)."""
        window = getattr(self.config, "sliding_window", None)
        types = getattr(self.config, "layer_types", None)
        if types is not None:
            return window if types[layer] == "sliding_attention" else None
        return window

    def attention_mask(self, layer: int, length: int) -> torch.Tensor | None:
        """A boolean [1, 1, T, T] mask (True = attend) for ``layer``, or None when plain causal attention is exact."""
        window = self.sliding_window(layer)
        if window is None or length <= window:
            return None  # sdpa is causal without a mask
        query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
        mask = (key <= query) & (query - key < window)  # the window transformers uses: q - k < window
        return mask[None, None].to(self.device)

    def _forward(self, module: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)
        rotary = self.rotary(hidden, positions)
        out = module(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out
