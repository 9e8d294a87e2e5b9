"""Centroid router initialisation for ``mix --router centroid``.

For every layer, expert e's router row is the mean router input (the hidden state entering the
MoE block) over its own domain's calibration tokens; the seed expert's row is the mean over all
tokens. Rows are centred by that overall mean and scaled (see ``moekit.routing.init``) so that
tokens start routed towards their domain's expert without saturating the softmax.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moekit.config import MixConfig
from moekit.data import load_token_blocks
from moekit.devices import choose_device
from moekit.errors import InvalidOptionError
from moekit.models import check_context_length
from moekit.routing.calibration import LayerwiseCalibrator
from moekit.routing.init import centroid_router
from moekit.steps.mix.inputs import MixInputs

_MAX_SCALE_TOKENS = 8192  # calibration tokens used to pick the router scale (subsampled)


class CentroidInit:
    """Computes centroid routers layer by layer as ``mix`` streams the model."""

    def __init__(self, inputs: MixInputs, blocks: dict[str, torch.Tensor], sharpness: float, dense_config: Any) -> None:
        self.inputs = inputs
        self.blocks = blocks
        self.sharpness = sharpness
        self.dense_config = dense_config
        self.calibrator: LayerwiseCalibrator | None = None
        self.capture_attention = False  # set for attention experts: their routers start from attention inputs
        self.seconds = 0.0  # time spent calibrating (tokenising, running layers), reported in the provenance
        self.in_domain_top1: dict[str, list[float]] = {d: [] for d in blocks if self._expert_of(d) is not None}

    def _expert_of(self, domain: str) -> int | None:
        names = [e.name for e in self.inputs.experts]
        return (
            names.index(domain)
            if domain in names and self.inputs.experts[names.index(domain)].kind == "branch"
            else None
        )

    def see_embedding(self, embedding: torch.Tensor) -> None:
        """Receive the averaged input embedding (fp32) as it streams by; it starts the calibration."""
        started = time.perf_counter()
        key = self.inputs.adapter.embedding_multiplier_key
        scale = float(self.inputs.seed.config.get(key, 1.0)) if key else 1.0
        self.calibrator = LayerwiseCalibrator(self.dense_config, embedding * scale, self.blocks, device=choose_device())
        self.calibrator.capture_attention = self.capture_attention
        self.seconds += time.perf_counter() - started

    def router_for_layer(self, layer: int, layer_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the averaged layer on the calibration data and return its router [E, hidden] (fp32, on the CPU)."""
        if self.calibrator is None:
            raise RuntimeError("embedding tensor not seen before the first layer")
        started = time.perf_counter()
        try:
            return self._router(layer, layer_tensors).cpu()
        finally:
            self.seconds += time.perf_counter() - started

    def _router(self, layer: int, layer_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.calibrator is not None
        prefix = f"model.layers.{layer}."
        stored = self.inputs.seed.to_stored(layer_tensors)  # fused layouts are rebuilt for the dense layer
        mlp_inputs = self.calibrator.run_layer(layer, {k.removeprefix(prefix): v for k, v in stored.items()})
        router = self._centroid_rows(layer, mlp_inputs)
        for domain, values in self.in_domain_top1.items():
            top1 = (mlp_inputs[domain] @ router.T).argmax(dim=-1)
            values.append(float((top1 == self._expert_of(domain)).float().mean()))
        return router

    def attention_router(self, layer: int) -> torch.Tensor:
        """The centroid router of ``layer``'s attention experts [E, hidden] (fp32, CPU), from the attention inputs
        the calibration of the layer's FFN router captured (``capture_attention``)."""
        assert self.calibrator is not None and self.calibrator.attention_inputs
        return self._centroid_rows(layer, self.calibrator.attention_inputs).cpu()

    def _centroid_rows(self, layer: int, inputs_by_domain: dict[str, torch.Tensor]) -> torch.Tensor:
        """Router rows: each branch's domain mean, the overall mean for the seed; centred and scaled."""
        everything = torch.cat(list(inputs_by_domain.values()))
        overall = everything.mean(dim=0)
        rows = []
        for expert in self.inputs.experts:
            rows.append(inputs_by_domain[expert.name].mean(dim=0) if expert.kind == "branch" else overall)
        step = -(-everything.shape[0] // _MAX_SCALE_TOKENS)  # ceil: at most _MAX_SCALE_TOKENS tokens
        try:
            return centroid_router(torch.stack(rows), overall, everything[::step], self.sharpness)
        except ValueError:
            raise InvalidOptionError(
                f"Centroid routers of layer {layer} are all zero: every domain's data gives the same mean "
                "hidden state.",
                "Use distinct data per domain (or --router random).",
            )

    def summary(self) -> dict[str, Any]:
        """Initial routing quality: per domain, the share of tokens whose top-1 is its own expert."""
        return {
            "calibration_seconds": round(self.seconds, 2),
            "init_in_domain_top1": {d: round(sum(v) / len(v), 4) for d, v in self.in_domain_top1.items() if v},
            "init_in_domain_top1_per_layer": {d: [round(x, 4) for x in v] for d, v in self.in_domain_top1.items()},
        }


def prepare_centroid_init(cfg: MixConfig, inputs: MixInputs) -> CentroidInit:
    """Check the router data against the experts, tokenise it, and return the initialiser."""
    from transformers import AutoConfig

    from moekit.models import load_tokenizer

    if cfg.upcycle is not None:
        raise InvalidOptionError(
            "--router centroid needs domain experts, but upcycled experts are identical copies.",
            "Use --router random with --upcycle.",
        )
    branch_names = [e.name for e in inputs.experts if e.kind == "branch"]
    missing = [n for n in branch_names if n not in cfg.router_data]
    if missing:
        raise InvalidOptionError(
            f"--router centroid needs data for every branch expert; missing: {', '.join(missing)}.",
            "Add --router-data NAME=PATH for each (e.g. --router-data code=code.jsonl).",
        )
    if len(cfg.router_data) < 2:
        raise InvalidOptionError(
            "--router centroid needs data from at least two domains: router rows are domain means minus the "
            "overall mean, so a single domain gives all-zero rows.",
            "Add --router-data for another expert, or general data for the seed expert (e.g. --router-data "
            "general=PATH).",
        )
    has_seed = any(e.kind == "seed" for e in inputs.experts)
    extra = [d for d in cfg.router_data if d not in branch_names]
    if extra and not has_seed:
        raise InvalidOptionError(
            f"Router data for {', '.join(extra)} matches no expert.",
            f"Name domains after the experts ({', '.join(branch_names)}), or keep the seed expert to absorb "
            "general data.",
        )
    check_context_length(inputs.seed.path, cfg.router_block_size, "--router-seq-len")
    started = time.perf_counter()
    tokenizer = load_tokenizer(inputs.seed.path)
    blocks = {
        domain: load_token_blocks(tokenizer, path, cfg.router_block_size, cfg.router_tokens)
        for domain, path in cfg.router_data.items()
    }
    init = CentroidInit(inputs, blocks, cfg.router_sharpness, AutoConfig.from_pretrained(inputs.seed.path))
    init.seconds = time.perf_counter() - started  # transformers' import and the tokenising count as calibration
    return init
