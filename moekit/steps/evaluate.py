"""``moekit eval``: held-out loss and perplexity per domain for several models, side by side.

Each model is evaluated with its own tokenizer (blocks are shared between models whose
tokenizers are identical). Loss is the mean next-token cross-entropy over every predicted token
of the blocks; perplexity is exp(loss). A run directory expands to its seed, branches, averaged
(uniform weight average of the branches), mixed and tuned models and the equal-compute baselines
(dense, upcycled) where they exist; without --data its branches' recorded held-out splits are
used, and the report gives each row's training compute (tokens, model FLOPs) beyond the seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moekit.config import EvalConfig
from moekit.data.domains import recorded_heldout
from moekit.data.sources import spec_paths
from moekit.data.store import tokenizer_fingerprint_of
from moekit.data.tokens import evaluation_blocks
from moekit.devices import choose_device
from moekit.errors import InvalidOptionError
from moekit.io.loading import load_causal_lm
from moekit.io.outputs import guard_output, write_file
from moekit.io.source import resolve_model_dir
from moekit.manifest import MANIFEST_NAME, load_manifest
from moekit.models import check_model_dir, check_token_ids, fit_context_length
from moekit.progress import progress_bar
from moekit.steps.baselines import DENSE_DIR, UPCYCLED_DIR, run_compute
from moekit.train.evaluation import block_losses, perplexity


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a moekit run directory."""
    return (path / MANIFEST_NAME).is_file() and (path / "branches").is_dir()


def expand_models(models: list[str]) -> dict[str, Path]:
    """Label -> directory; a run directory becomes its seed, branches, mixed and tuned models."""
    labelled: dict[str, Path] = {}
    for spec in models:
        path = Path(spec)
        if path.is_dir() and is_run_dir(path):
            manifest = load_manifest(path)
            labelled["seed"] = Path(manifest.seed.path)
            labelled.update({f"branch {n}": manifest.branch_dir(path, n) for n in manifest.branches})
            labelled.update(
                {
                    name: path / name
                    for name in ("averaged", "mixed", "tuned", DENSE_DIR, UPCYCLED_DIR)
                    if (path / name / "config.json").is_file()
                }
            )
            labelled.update({d.name: d for d in grown_models(path, manifest) if d.name not in labelled})
        else:
            directory = resolve_model_dir(spec)
            label = directory.name if directory.name not in labelled else f"{directory.parent.name}/{directory.name}"
            base, count = label, 2
            while label in labelled:  # never let two models share a row
                label, count = f"{base} ({count})", count + 1
            labelled[label] = directory
    return labelled


def grown_models(run_dir: Path, manifest: Any) -> list[Path]:
    """Models a run made beyond mix/tune/baselines: ``mix --add-expert`` outputs and their tunes, in stage order."""
    found = []
    for record in manifest.stages:
        if record.stage == "add-expert" or (
            record.stage.startswith("tune:") and record.stage[5:] in {p.name for p in found}
        ):
            out = Path(str(record.outputs.get("out", "")))
            if out.name and (run_dir / out.name / "config.json").is_file() and run_dir / out.name not in found:
                found.append(run_dir / out.name)
    return found


def _run_dir_heldout(cfg: EvalConfig, tokenizer: Any) -> dict[str, torch.Tensor]:
    """Each branch domain's held-out blocks from the split the run recorded (never a new split), in eval's --seq-len."""
    run = next(Path(m) for m in cfg.models if Path(m).is_dir() and is_run_dir(Path(m)))
    manifest = load_manifest(run)
    branches = {n: r for n, r in manifest.branches.items() if r.data}
    if not branches:
        raise InvalidOptionError(f"{run} has no branch data to evaluate on.", "Pass --data DOMAIN=PATH.")
    held = {}
    for name, record in branches.items():
        view = recorded_heldout(
            tokenizer,
            name,
            record.data,
            record.val_data,
            record.heldout,
            cfg.seq_len,
            cfg.text_field,
            run / ".cache" / "tokens",
        )
        held[name] = view.head(max(1, cfg.max_tokens // view.block_size))
    return held


def evaluate_models(cfg: EvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """Per-model, per-domain held-out loss/perplexity, averages and the best model per domain."""
    from moekit.models import load_tokenizer

    models = expand_models(cfg.models)
    if not cfg.data and not any(Path(m).is_dir() and is_run_dir(Path(m)) for m in cfg.models):
        raise InvalidOptionError(
            "No evaluation data.",
            "Pass --data DOMAIN=PATH (or a run directory, whose branches' held-out data is used).",
        )
    for label, directory in models.items():  # every model checked before the first one is evaluated
        check_model_dir(directory, f"Model '{label}',")
    fit_context_length(list(models.values()), cfg)  # one block length for every model: comparable numbers
    guard_eval_outputs(cfg, models)
    blocks_by_tokenizer: dict[str, dict[str, torch.Tensor]] = {}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, directory in models.items():
        tokenizer = load_tokenizer(directory)
        key = tokenizer_fingerprint_of(tokenizer)
        if key not in blocks_by_tokenizer:
            blocks_by_tokenizer[key] = (
                {
                    d: evaluation_blocks(tokenizer, specs, cfg.seq_len, cfg.max_tokens, cfg.text_field)
                    for d, specs in cfg.data.items()
                }
                if cfg.data
                else _run_dir_heldout(cfg, tokenizer)
            )
        results[label] = _evaluate_one(directory, blocks_by_tokenizer[key], cfg, label, show_progress)
    domains = list(next(iter(results.values())))
    for scores in results.values():
        scores["average"] = {"loss": sum(scores[d]["loss"] for d in domains) / len(domains)}
        scores["average"]["perplexity"] = perplexity(scores["average"]["loss"])
    best = {d: min(results, key=lambda m: results[m][d]["loss"]) for d in [*domains, "average"]}
    report = {
        "models": {label: str(path) for label, path in models.items()},
        "domains": domains,
        "results": results,
        "best": best,
        "same_tokenizer": len(blocks_by_tokenizer) == 1,
    }
    runs = [Path(m) for m in cfg.models if Path(m).is_dir() and is_run_dir(Path(m))]
    if len(runs) == 1:  # the training compute of each row of a run (what the baselines are matched on)
        spent = run_compute(runs[0])
        report["compute"] = {label: spent[label].as_dict() for label in results if label in spent}
    return report


def evaluate_with_harness(cfg: EvalConfig, show_progress: bool = True) -> dict[str, Any]:
    """Held-out losses (when there is data: ``--data`` or a run directory) and lm-eval's scores under ``harness``
    (with ``--tasks``)."""
    report: dict[str, Any] = {}
    has_data = bool(cfg.data) or any(Path(m).is_dir() and is_run_dir(Path(m)) for m in cfg.models)
    if cfg.tasks:
        from moekit.steps.evaluate_harness import check_harness, run_harness

        check_harness(cfg)  # before the first model is loaded
    if has_data or not cfg.tasks:
        report = evaluate_models(cfg, show_progress)
    if cfg.tasks:
        models = expand_models(cfg.models)
        for label, directory in models.items():
            check_model_dir(directory, f"Model '{label}',")
        guard_eval_outputs(cfg, models)
        report["harness"] = run_harness(models, cfg)
    return report


def record_eval(cfg: EvalConfig, report: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """Write ``report`` to ``--json`` (atomically), and a run's own table to RUN_DIR/eval.json, where
    ``moekit report`` finds it; return (the --json file, RUN_DIR/eval.json), None for what was not written.

    A run's own table is the loss table of one run directory on its recorded held-out split (no
    ``--data``, no ``--task``): what the recipe's eval stage writes there too.
    """
    text = json.dumps(report, indent=1)
    if cfg.json_path is not None:
        write_file(cfg.json_path, text, "eval report", cfg.force)
    recorded = run_record_path(cfg)
    if recorded is not None:
        write_file(recorded, text, "eval report", force=True)  # the run's own record, replaced by each eval of the run
    return cfg.json_path, recorded


def run_record_path(cfg: EvalConfig) -> Path | None:
    """RUN_DIR/eval.json when ``cfg`` evaluates one run directory on its recorded split (no --data, no --task)."""
    runs = [Path(m) for m in cfg.models if is_run_dir(Path(m))]
    return runs[0] / "eval.json" if cfg.task is None and not cfg.data and len(cfg.models) == 1 and runs else None


def guard_eval_outputs(cfg: EvalConfig, models: dict[str, Path]) -> None:
    """Refuse, before any model is loaded, a --json path that would overwrite an input or a file eval did not write."""
    if cfg.json_path is not None:
        runs = [Path(m) for m in cfg.models if is_run_dir(Path(m))]
        read = [*models.values(), *spec_paths(s for specs in cfg.data.values() for s in specs)]
        guard_output(cfg.json_path, "eval report", cfg.force, read, runs[0] if runs else None)


def _evaluate_one(
    directory: Path, blocks: dict[str, torch.Tensor], cfg: EvalConfig, label: str, show_progress: bool
) -> dict[str, dict[str, float]]:
    device = choose_device(cfg.device)  # fp32 on any device: held-out losses are compared to the third decimal
    model = load_causal_lm(directory, torch.float32).to(device).eval()
    for domain, domain_blocks in blocks.items():
        check_token_ids(int(domain_blocks.max()) if domain_blocks.numel() else -1, model, f"The data of {domain}")
    scores = {}
    with torch.no_grad(), progress_bar(f"eval {label}", sum(len(b) for b in blocks.values()), show_progress) as advance:
        for domain, domain_blocks in blocks.items():
            losses = []
            for chunk in domain_blocks.split(cfg.batch_size):
                losses.append(block_losses(model, chunk.long().to(device)).cpu())
                advance(len(chunk))
            loss = float(torch.cat(losses).mean())  # equal-length blocks: the token-weighted mean
            scores[domain] = {"loss": loss, "perplexity": perplexity(loss), "tokens": int(domain_blocks.numel())}
    return scores
