"""``moekit generate``: run a model moekit built (or any causal LM) on a prompt, and show the routing.

Decoding is transformers' own ``generate`` (greedy or sampling, KV cache), with text streamed
as it is produced. With SCMoE (:mod:`moekit.routing.contrast`) one logits processor adds the
weak-routing pass. The expert each token went to is read afterwards from one forward pass over
the prompt and the generated text with the routers recorded: a token's routing is computed when
it is the input, so the last generated token, which is never fed back while decoding, gets its
routing from that pass too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.config import GenerateConfig
from moekit.devices import choose_device
from moekit.errors import InvalidOptionError
from moekit.io.loading import load_causal_lm
from moekit.io.source import resolve_model_dir
from moekit.models import check_model_dir
from moekit.provenance import expert_names


@dataclass
class GeneratedToken:
    """One generated token: its id, its text, and its top expert per MoE layer (empty for a dense model)."""

    id: int
    text: str
    experts: list[int] = field(default_factory=list)

    def top_expert(self, layer: int | None) -> int | None:
        """The top expert in ``layer``, or the most frequent top expert over the layers (ties: the lowest index)."""
        if not self.experts:
            return None
        if layer is not None:
            return self.experts[layer]
        return max(sorted(set(self.experts)), key=self.experts.count)


@dataclass
class Generation:
    """What ``generate`` produced for one prompt."""

    prompt: str
    text: str
    tokens: list[GeneratedToken]
    prompt_tokens: int
    seconds: float
    expert_names: list[str] | None = None  # None for a dense model
    moe_layers: int = 0

    def as_dict(self, layer: int | None = None) -> dict[str, Any]:
        """A JSON-ready record (``layer``: the layer whose top expert is reported; None: the majority over layers)."""

        def name(expert: int | None) -> str | int | None:
            return (
                self.expert_names[expert]
                if expert is not None and self.expert_names and expert < len(self.expert_names)
                else expert
            )

        return {
            "prompt": self.prompt,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.tokens),
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(len(self.tokens) / self.seconds, 2) if self.seconds > 0 else None,
            "experts": self.expert_names,
            "routing_layer": layer if layer is not None else "majority",
            "tokens": [
                {"id": t.id, "text": t.text, "expert": name(t.top_expert(layer)), "experts_per_layer": t.experts}
                for t in self.tokens
            ],
        }


def guard_generation_json(path: Path, force: bool, model: str) -> None:
    """Refuse, before the model loads, a --json path that would overwrite the model or a file generate did not write."""
    from moekit.io.outputs import guard_output

    model_dir = Path(model)
    guard_output(path, "generation", force, [model_dir] if model_dir.exists() else [])


def write_generation(generation: Generation, path: Path, layer: int | None = None, force: bool = False) -> Path:
    """Write ``generation`` as JSON to ``path`` (atomically; ``layer``: the MoE layer of each token's expert, None
    for the majority)."""
    import json

    from moekit.io.outputs import write_file

    return write_file(path, json.dumps(generation.as_dict(layer), indent=1), "generation", force)


class Generator:
    """A loaded model and tokenizer, ready to generate for one prompt after another (interactive use)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        from moekit.models import load_tokenizer

        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        check_model_dir(self.model_dir, "The model", "Give a model directory written by save_pretrained (or a hub id).")
        self.device = choose_device(cfg.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        if dtype is None:  # auto: full precision on a CPU, half precision on a GPU
            dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.model = load_causal_lm(self.model_dir, dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.routers = _routers_or_none(self.model)
        if cfg.scmoe and self.routers is None:
            raise InvalidOptionError(
                f"{cfg.model} is a dense model: SCMoE contrasts two routings of a Mixture-of-Experts model.",
                "Drop --scmoe, or give an MoE (e.g. the one `moekit mix` or `moekit tune` wrote).",
            )
        if (
            cfg.routing_layer is not None
            and self.routers is not None
            and not 0 <= cfg.routing_layer < len(self.routers)
        ):
            raise InvalidOptionError(
                f"--routing-layer {cfg.routing_layer}: the model has {len(self.routers)} MoE layers.",
                f"Give a layer from 0 to {len(self.routers) - 1}, or leave it out for the majority over layers.",
            )
        if cfg.scmoe:
            from moekit.routing.contrast import check_contrast_applies

            check_contrast_applies(self.model, cfg.scmoe_rank)
        self.expert_names = (
            (expert_names(self.model_dir) or [f"expert{i}" for i in range(int(self.routers[0].weight.shape[0]))])
            if self.routers
            else None
        )

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """The prompt's token ids [1, T]: through the chat template when the tokenizer has one (unless raw)."""
        if not self.cfg.raw and getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            ids = encoded["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise InvalidOptionError("The prompt is empty after tokenisation.", "Give a prompt with some text.")
        return ids.to(self.device)

    def generate(self, prompt: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """Generate a continuation of ``prompt``; ``on_text`` receives the text as it is produced."""
        from transformers import LogitsProcessorList

        cfg = self.cfg
        ids = self.prompt_ids(prompt)
        processors = LogitsProcessorList()
        if cfg.scmoe:
            from moekit.routing.contrast import SelfContrast

            processors.append(SelfContrast(self.model, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_rank))
        sampling = (
            {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
            if cfg.sample
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        if cfg.sample:
            torch.manual_seed(cfg.random_seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        started = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=cfg.max_new_tokens,
                logits_processor=processors,
                streamer=_Streamer(self.tokenizer, on_text) if on_text else None,
                pad_token_id=pad,
                **sampling,
            )
        seconds = time.perf_counter() - started
        new_ids = output[0, ids.shape[1] :].tolist()
        experts = self._top_experts(output, ids.shape[1]) if self.routers is not None else [[] for _ in new_ids]
        tokens = [
            GeneratedToken(i, self.tokenizer.decode([i], skip_special_tokens=True), e) for i, e in zip(new_ids, experts)
        ]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return Generation(prompt, text, tokens, int(ids.shape[1]), seconds, self.expert_names, len(self.routers or []))

    def _top_experts(self, sequence: torch.Tensor, start: int) -> list[list[int]]:
        """Per generated token, its top expert in every MoE layer, from one recorded forward pass over ``sequence``."""
        from moekit.routing.control import RoutingController

        if sequence.shape[1] <= start:
            return []
        controller = RoutingController(self.model)
        try:
            with torch.no_grad():
                self.model(input_ids=sequence)
            records = controller.collected()
        finally:
            controller.remove()
        per_layer = [
            _first_choice(r.weights, r.indices)[start : sequence.shape[1]] for r in records
        ]  # batch of one: rows are positions
        return torch.stack(per_layer, dim=1).tolist()


def _first_choice(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each token's highest-weighted expert (routers need not return their top-k sorted)."""
    return indices.gather(-1, weights.float().argmax(dim=-1, keepdim=True))[..., 0].cpu()


def _routers_or_none(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    from moekit.errors import MoekitError
    from moekit.routing.control import find_routers

    try:
        return [router for _, router in find_routers(model)]
    except MoekitError:
        return None  # a dense model: generation works, there is no routing to show


class _Streamer:
    """transformers' streamer interface (put/end): decodes the new tokens as they come, whole characters only."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.prompt_seen = False
        self.ids: list[int] = []
        self.printed = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character cut in half: wait for its other bytes
            return
        self.on_text(text[self.printed :])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.printed:
            self.on_text(text[self.printed :])
        self.printed = len(text)
