"""``moekit eval --task``: exact-match accuracy of each model on a generation task, greedy and with SCMoE.

A run directory expands to its models as for held-out loss. SCMoE is scored for every MoE whose
routing ranks at least ``scmoe_rank`` experts per token; other rows get no SCMoE figure (None).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.config import EvalConfig
from moekit.devices import choose_device
from moekit.errors import MoekitError
from moekit.io.loading import load_causal_lm
from moekit.models import check_model_dir
from moekit.progress import progress_bar
from moekit.steps.evaluate import expand_models
from moekit.tasks import exact_match_accuracy, task_problems


def _contrast_applies(model: torch.nn.Module, rank: int) -> bool:
    from moekit.routing.contrast import check_contrast_applies

    try:
        check_contrast_applies(model, rank)
    except MoekitError:  # a dense model, or one that routes to fewer than rank experts
        return False
    return True


def evaluate_task(cfg: EvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """Per model: the task's exact-match accuracy greedy, and with SCMoE where it applies (else None)."""
    from moekit.models import load_tokenizer
    from moekit.routing.contrast import SelfContrast

    assert cfg.task is not None
    models = expand_models(cfg.models)
    for label, directory in models.items():
        check_model_dir(directory, f"Model '{label}',")
    problems = task_problems(cfg.task, cfg.problems)
    device = choose_device(cfg.device)
    results: dict[str, dict[str, float | None]] = {}
    for label, directory in models.items():
        model = load_causal_lm(directory, torch.float32).to(device).eval()
        tokenizer = load_tokenizer(directory)
        scmoe = cfg.scmoe and _contrast_applies(model, cfg.scmoe_rank)
        with progress_bar(f"{cfg.task} {label}", len(problems) * (2 if scmoe else 1), show_progress) as advance:
            greedy = exact_match_accuracy(model, tokenizer, problems, cfg.max_new_tokens, advance=advance)
            contrast = (
                exact_match_accuracy(
                    model,
                    tokenizer,
                    problems,
                    cfg.max_new_tokens,
                    advance=advance,
                    processor=lambda m: SelfContrast(m, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_rank),
                )
                if scmoe
                else None
            )
        results[label] = {"greedy": greedy, "scmoe": contrast}
    return {
        "task": cfg.task,
        "problems": len(problems),
        "max_new_tokens": cfg.max_new_tokens,
        "results": results,
        "scmoe": {"beta": cfg.scmoe_beta, "alpha": cfg.scmoe_alpha, "rank": cfg.scmoe_rank} if cfg.scmoe else None,
    }
