"""``tune --hypermoe``: HyperMoE's modules added to a moekit_moe MoE before tuning (Zhao et al. 2024)."""

from __future__ import annotations

from typing import Any

import torch

from moekit.config import TuneConfig
from moekit.errors import InvalidOptionError


def has_hypermoe(model: torch.nn.Module) -> bool:
    """Whether the model carries HyperMoE's modules (moekit_moe with ``hypermoe`` in its config)."""
    return bool(getattr(model.config, "hypermoe", None))


def add_hypermoe(model: torch.nn.Module, cfg: TuneConfig) -> None:
    """Give ``model`` HyperMoE's hypernetwork, expert embeddings and selection MLPs (adapters start at zero).

    Refused for models outside moekit's own family (no standard architecture has HyperMoE, so
    the output must carry its modeling code) and for a model that has them already.
    """
    settings = cfg.hypermoe
    assert settings is not None
    model_type = str(getattr(model.config, "model_type", ""))
    if not callable(getattr(model, "enable_hypermoe", None)):  # only moekit's own model classes can grow HyperMoE
        raise InvalidOptionError(
            f"--hypermoe needs a model of moekit's own family (moekit_moe); {cfg.model} is {model_type}. No "
            "standard architecture has HyperMoE's hypernetwork, so the tuned model must ship its modeling code.",
            "Mix the branches with --target moekit_moe (moekit mix RUN_DIR --target moekit_moe), then tune that "
            "MoE with --hypermoe.",
        )
    if has_hypermoe(model):
        raise InvalidOptionError(
            f"{cfg.model} has HyperMoE already ({model.config.hypermoe}).",
            "Tune it without --hypermoe (its HyperMoE modules train with --train hypermoe or all).",
        )
    # seeded by the loop's seed: two runs with the same options start from the same HyperMoE weights (so a
    # resumed run equals an uninterrupted one); the global RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.loop.seed)
        model.enable_hypermoe(**settings.model_dump())


def is_hypermoe_parameter(name: str) -> bool:
    """Whether a parameter belongs to HyperMoE (the shared hypernetwork or a layer's expert embeddings and MLP)."""
    return name.startswith("hypernet.") or ".mlp.hyper." in name


def check_hypermoe_training(model: torch.nn.Module, cfg: TuneConfig) -> None:
    """``--train hypermoe`` needs HyperMoE's modules (given by --hypermoe, or already in the model)."""
    if cfg.train == "hypermoe" and not has_hypermoe(model):
        raise InvalidOptionError(
            f"--train hypermoe trains HyperMoE's modules, and {cfg.model} has none.",
            "Add them with --hypermoe (on a moekit_moe MoE), or choose another --train.",
        )


def hypermoe_record(model: Any) -> dict[str, Any] | None:
    """HyperMoE's settings and parameter count, for moekit.yaml and the model card (None without it)."""
    if not has_hypermoe(model):
        return None
    count = sum(p.numel() for name, p in model.named_parameters() if is_hypermoe_parameter(name))
    return {**dict(model.config.hypermoe), "parameters": count}
