"""``moekit eval --tasks``: EleutherAI's lm-evaluation-harness on the models as moekit loads them.

Each model is loaded by moekit (so moekit's own model family and SCMoE decoding work) and handed
to lm-eval's Python API as an already built model (``HFLM(pretrained=model, tokenizer=...)``).
Tasks come from lm-eval's registry, plus the task YAMLs of ``--tasks-dir`` (its
``include_path``): local files need no hub (``dataset_path: json`` with
``dataset_kwargs.data_files``). With ``--scmoe``, each MoE whose routing ranks enough experts is
evaluated a second time with SCMoE: its generations use the self-contrast logits processor (one
sequence at a time, as SCMoE needs), its log-likelihoods the contrast of the strong and weak
passes' logits.

Per model and task, every metric lm-eval reports with its standard error, and the number of
documents scored. lm-eval is an optional extra: ``pip install 'moekit[harness]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moekit.config import EvalConfig
from moekit.devices import choose_device
from moekit.errors import InvalidOptionError, MoekitError
from moekit.io.loading import load_causal_lm

HARNESS_HINT = "pip install 'moekit[harness]' (lm-eval 0.4)"


def check_harness(cfg: EvalConfig) -> Any:
    """lm-eval's TaskManager for ``cfg.tasks`` (and ``cfg.tasks_dir``); a clear error when lm-eval is missing, the
    directory is absent or a task is unknown."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InvalidOptionError("--tasks runs lm-evaluation-harness, which is not installed.", HARNESS_HINT) from None
    if cfg.tasks_dir is not None and not cfg.tasks_dir.is_dir():
        raise InvalidOptionError(f"--tasks-dir {cfg.tasks_dir} is not a directory.", "Give the folder of task YAMLs.")
    manager = TaskManager(include_path=str(cfg.tasks_dir) if cfg.tasks_dir else None)
    unknown = [t for t in cfg.tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or in {cfg.tasks_dir}" if cfg.tasks_dir else " (local tasks need --tasks-dir)"
        raise InvalidOptionError(
            f"lm-eval knows no task {', '.join(unknown)}{where}.",
            "See `lm_eval --tasks list`, or write a task YAML into --tasks-dir.",
        )
    return manager


def _language_model(model: torch.nn.Module, tokenizer: Any, cfg: EvalConfig, device: torch.device, scmoe: bool) -> Any:
    """lm-eval's HF model wrapper around a loaded model; with ``scmoe`` the SCMoE variant (batch 1)."""
    from lm_eval.models.huggingface import HFLM

    if not scmoe:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    from transformers import LogitsProcessorList

    from moekit.routing.contrast import SelfContrast, contrast_logits, rank_routing

    class ScmoeLM(HFLM):  # type: ignore[misc, valid-type]
        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            strong = super()._model_call(inps, attn_mask, labels)
            with rank_routing(self.model, cfg.scmoe_rank):
                weak = super()._model_call(inps, attn_mask, labels)
            return contrast_logits(strong.float(), weak.float(), cfg.scmoe_beta, cfg.scmoe_alpha)

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            contrast = SelfContrast(self.model, cfg.scmoe_beta, cfg.scmoe_alpha, cfg.scmoe_rank)
            return super()._model_generate(
                context, max_length, stop, logits_processor=LogitsProcessorList([contrast]), **kwargs
            )

    return ScmoeLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device=str(device))


def _scores(output: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: each metric's value and standard error (lm-eval's ``metric,filter`` keys), and documents scored."""
    scores: dict[str, dict[str, Any]] = {}
    for task, values in output["results"].items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in values.items():
            name, _, flt = key.partition(",")
            if not flt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            label = name if flt == "none" else f"{name} ({flt})"
            stderr = values.get(f"{name}_stderr,{flt}")
            metrics[label] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        samples = output.get("n-samples", {}).get(task, {})
        scores[task] = {"metrics": metrics, "n": samples.get("effective")}
    return scores


def _contrast_applies(model: torch.nn.Module, rank: int) -> bool:
    from moekit.routing.contrast import check_contrast_applies

    try:
        check_contrast_applies(model, rank)
    except MoekitError:
        return False
    return True


def run_harness(models: dict[str, Path], cfg: EvalConfig) -> dict[str, Any]:
    """lm-eval's scores of every model on ``cfg.tasks`` (and of each MoE with SCMoE when asked), by label."""
    from lm_eval import simple_evaluate

    from moekit.models import load_tokenizer

    manager = check_harness(cfg)
    device = choose_device(cfg.device)
    results: dict[str, Any] = {}
    for label, directory in models.items():
        model = load_causal_lm(directory, torch.float32).to(device).eval()
        tokenizer = load_tokenizer(directory)
        variants = [(label, False)]
        if cfg.scmoe and _contrast_applies(model, cfg.scmoe_rank):
            variants.append((f"{label} (SCMoE)", True))
        for name, scmoe in variants:
            lm = _language_model(model, tokenizer, cfg, device, scmoe)
            output = simple_evaluate(
                model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.task_limit, log_samples=False
            )
            results[name] = _scores(output)
    return {"tasks": list(cfg.tasks), "tasks_dir": str(cfg.tasks_dir) if cfg.tasks_dir else None, "results": results}
