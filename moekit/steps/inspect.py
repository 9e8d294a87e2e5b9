"""``moekit inspect``: static statistics of a model, and its routing on domain data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.config import InspectConfig
from moekit.data import evaluation_blocks
from moekit.data.sources import spec_paths
from moekit.devices import choose_device, inference_dtype
from moekit.errors import InvalidOptionError
from moekit.inspection.routing import collect_routing, routing_report
from moekit.inspection.static import static_report
from moekit.io.checkpoint import Checkpoint
from moekit.io.loading import load_causal_lm
from moekit.io.outputs import atomic_output_dir, guard_output, write_file
from moekit.io.source import resolve_model_dir
from moekit.models import check_token_ids, fit_context_length
from moekit.progress import progress_bar
from moekit.provenance import expert_names


def inspect_model(
    cfg: InspectConfig, show_progress: bool = True, on_static: Callable[[dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], list[Path]]:
    """The report of ``cfg.model``: static statistics and, with data, its routing; written to --json and --plot.

    ``on_static`` receives the static statistics as soon as they are known (before the routing pass,
    which can take minutes, and which a dense model refuses). Returns the report (``model``,
    ``static``, ``routing``: None without data) and the paths written.
    """
    model_dir, static = inspect_static(cfg.model)
    guard_inspect_outputs(cfg, model_dir)
    if on_static is not None:
        on_static(static)
    report = {"model": str(model_dir), "static": static, "routing": None}
    if cfg.data:
        report["routing"] = inspect_routing(cfg, model_dir, static, show_progress)
    return report, write_outputs(cfg, report)


def inspect_static(model: str) -> tuple[Path, dict[str, Any]]:
    """The model's directory and its static report."""
    model_dir = resolve_model_dir(model)
    return model_dir, static_report(Checkpoint(model_dir))


def inspect_routing(
    cfg: InspectConfig, model_dir: Path, static: dict[str, Any], show_progress: bool = True
) -> dict[str, Any]:
    """Run the data through the MoE and return the routing report (adds files for --json/--plot)."""
    from moekit.models import load_tokenizer

    if not static["is_moe"]:
        raise InvalidOptionError(
            f"{cfg.model} is a dense {static['model_type']} model: it has no routers, so there is no routing to "
            "inspect.",
            "Run `moekit inspect MODEL` without --data for its static statistics, or inspect an MoE.",
        )
    fit_context_length([model_dir], cfg)
    tokenizer = load_tokenizer(model_dir)
    blocks = {
        d: evaluation_blocks(tokenizer, specs, cfg.seq_len, cfg.max_tokens, cfg.text_field)
        for d, specs in cfg.data.items()
    }
    device = choose_device(cfg.device)
    dtype = inference_dtype(device, Checkpoint(model_dir).dtype())
    model = load_causal_lm(model_dir, dtype).to(device)
    for domain, domain_blocks in blocks.items():
        check_token_ids(int(domain_blocks.max()) if domain_blocks.numel() else -1, model, f"The data of {domain}")
    with progress_bar("routing blocks", sum(len(b) for b in blocks.values()), show_progress) as advance:
        tally = collect_routing(model, blocks, cfg.batch_size, advance, cfg.tokens_layer)
    report = routing_report(tally, expert_names(model_dir))
    report["samples"] = {
        d: {**s, "text": [tokenizer.decode([i]) for i in s["ids"]]} for d, s in report["samples"].items()
    }
    return report


def write_outputs(cfg: InspectConfig, report: dict[str, Any]) -> list[Path]:
    """Write --json and --plot outputs; return the paths written."""
    from moekit.report.inspect_page import write_plots

    written = []
    if cfg.plot_dir is not None and report.get("routing"):
        with atomic_output_dir(cfg.plot_dir, "plots", cfg.force) as tmp:
            names = [p.name for p in write_plots(report, tmp)]
        written += [cfg.plot_dir / name for name in names]
    if cfg.json_path is not None:
        written.append(write_file(cfg.json_path, json.dumps(report, indent=1), "routing report", cfg.force))
    return written


def guard_inspect_outputs(cfg: InspectConfig, model_dir: Path) -> None:
    """Refuse, before the routing pass, --json and --plot paths that would overwrite an input or what inspect did not
    write."""
    read = [model_dir, *spec_paths(s for specs in cfg.data.values() for s in specs)]
    if cfg.plot_dir is not None:
        guard_output(cfg.plot_dir, "plots", cfg.force, read)
    if cfg.json_path is not None:
        inside = cfg.plot_dir is not None and Path(cfg.json_path).absolute().parent == Path(cfg.plot_dir).absolute()
        guard_output(cfg.json_path, "routing report", cfg.force or inside, read)
