"""``moekit tune``: train the mixed MoE (router first of all) with load balancing (BTX's MoE finetuning).

The data is a mixture of domains with set shares. ``train`` selects what learns: everything
(BTX), only the routers, or routers and attention (BTX found freezing experts costs nothing).
Balancing terms (Switch aux loss or BTX's gate-value variant, router z-loss, micro or global
batch scope) are added to the LM loss and reported by name with per-step load metrics. It reuses
the training loop of ``train`` (resume, accelerate) and writes the same HF MoE format, with the
config's routing settings unchanged.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from moekit.config import TuneConfig
from moekit.data.blocks import MixtureBlocks
from moekit.data.domains import domains_data, record_heldout
from moekit.distributed import Engine
from moekit.errors import UnsupportedArchitectureError
from moekit.io.atomic import check_output_apart, check_output_dir
from moekit.io.config_json import dtype_name
from moekit.io.loading import load_causal_lm
from moekit.manifest import StageRecord, load_manifest, now_iso, updating_manifest
from moekit.routing.control import RoutingController
from moekit.routing.objective import BalancedObjective, BalanceSettings
from moekit.steps.inputs import check_context_length, check_model_dir
from moekit.steps.model_io import resolve_save_dtype, write_trained_model
from moekit.training import LoopJob, make_loop_engine, run_loop


@dataclass
class TuneResult:
    """What ``tune`` wrote and how the run ended."""

    out: Path
    steps: int
    resumed_from: int
    last_row: dict[str, Any]
    eval: dict[str, float]
    saved_dtype: str = ""
    unchanged_share: float | None = None  # share of weights bit-identical to the input MoE after saving


def work_dir_for(cfg: TuneConfig) -> Path:
    """Where checkpoints and metrics live while tuning: RUN_DIR/tune, or OUT.work next to OUT."""
    return cfg.run_dir / "tune" if cfg.run_dir is not None else cfg.out.parent / f"{cfg.out.name}.work"


def is_routed_expert(name: str) -> bool:
    """Whether a parameter belongs to the routed experts (transformers 5 keeps them in an ``experts`` module;
    a Qwen2-MoE ``shared_expert`` is not one of them)."""
    return ".experts." in f"{name}."


def trainable_predicate(cfg: TuneConfig, controller: RoutingController) -> Any:
    """Which parameters learn, by name.

    ``all`` (BTX); ``router``; ``router+attn`` (routers and attention only: embeddings, norms,
    LM head, experts and any shared expert stay frozen); ``all-but-experts`` (BTX's "frozen
    experts" ablation: everything but the routed experts learns).
    """
    router_prefixes = tuple(f"{name}." for name, _ in controller.routers)
    if cfg.train == "all":
        return lambda name: True
    if cfg.train == "router":
        return lambda name: name.startswith(router_prefixes)
    if cfg.train == "all-but-experts":
        return lambda name: not is_routed_expert(name)
    return lambda name: name.startswith(router_prefixes) or ".self_attn." in name


def refuse_bias_balancing(model: torch.nn.Module, controller: RoutingController) -> None:
    """Bias balancing needs a selection bias the exported model keeps; say why it cannot run."""
    if not any(hasattr(router, "e_score_correction_bias") for _, router in controller.routers):
        raise UnsupportedArchitectureError(
            f"--balance bias is refused for {model.config.model_type}: loss-free balancing learns a per-expert "
            "bias that changes which experts are selected, also at inference (DeepSeek-V3 stores it as "
            f"e_score_correction_bias), and {type(model).__name__}'s routers have no such parameter. The "
            "bias would be lost on export and the saved model would route differently from the tuned one.",
            "Use --balance switch (default, optionally with --balance-scope global) or --balance btx.",
        )
    raise UnsupportedArchitectureError(
        f"--balance bias is not implemented for {model.config.model_type} routers yet (moekit's own targets have "
        "no selection bias to train).",
        "Use --balance switch or --balance btx.",
    )


def _add_provenance(model_dir: Path, cfg: TuneConfig, result_row: dict[str, Any]) -> Any:
    def add(tmp: Path) -> None:
        record = {
            "stage": "tune", "created": now_iso(), "from": str(model_dir), "data": cfg.data,
            "mixture": cfg.mixture or {d: 1 / len(cfg.data) for d in cfg.data}, "train": cfg.train,
            "balance": {"kind": cfg.balance, "aux_coef": cfg.aux_coef, "z_coef": cfg.z_coef, "scope": cfg.balance_scope},
            "routing": cfg.routing, "loop": cfg.loop.model_dump(mode="json"), "final": result_row,
        }
        previous = model_dir / "moekit.yaml"
        history = yaml.safe_load(previous.read_text()) if previous.is_file() else None
        (tmp / "moekit.yaml").write_text(yaml.safe_dump({"tune": record, "input": history}, sort_keys=False))
        card = (model_dir / "README.md").read_text() if (model_dir / "README.md").is_file() else f"# {cfg.out.name}\n"
        budget = f"{cfg.loop.max_steps} steps" if cfg.loop.max_steps else f"{cfg.loop.max_tokens:,} tokens"
        balancing = "no balancing loss" if cfg.balance == "none" else f"{cfg.balance} balancing (coefficient {cfg.aux_coef}, {cfg.balance_scope} scope)"
        extras = (f", router z-loss {cfg.z_coef}" if cfg.z_coef else "") + (f", {cfg.routing} routing while training" if cfg.routing != "topk" else "")
        card += f"\n## Tuned\n\nFine-tuned by `moekit tune` ({cfg.train} parameters, {budget}) on {', '.join(cfg.data)} with {balancing}{extras}. Details: `moekit.yaml`.\n"
        (tmp / "README.md").write_text(card)

    return add


def tune_inputs(cfg: TuneConfig) -> list[Path]:
    """Directories tune reads or that its input came from: the MoE, and the seed and branches it was mixed from.

    ``--out --force`` replaces the output; none of these may be, contain or lie inside it.
    """
    inputs = [Path(cfg.model)]
    provenance = Path(cfg.model) / "moekit.yaml"
    try:
        record = yaml.safe_load(provenance.read_text(encoding="utf-8")) if provenance.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        record = None  # provenance is informative only; an unreadable one names no inputs
    while isinstance(record, dict) and "seed" not in record and isinstance(record.get("input"), dict):
        record = record["input"]  # a tuned model's provenance wraps its input's
    if isinstance(record, dict):
        inputs += [Path(str(record["seed"]))] if record.get("seed") else []
        inputs += [Path(str(e["source"])) for e in record.get("experts") or [] if isinstance(e, dict) and e.get("source")]
    if cfg.run_dir is not None:
        manifest = load_manifest(cfg.run_dir)
        inputs += [Path(manifest.seed.path)] + [manifest.branch_dir(cfg.run_dir, n) for n in manifest.branches]
    return [p for p in inputs if p.exists()]


def tune(cfg: TuneConfig, show_progress: bool = True) -> TuneResult:
    """Tune the MoE at ``cfg.model`` on the data mixture and write it to ``cfg.out``."""
    check_model_dir(cfg.model, "The MoE to tune,", "Mix the branches first (moekit mix RUN_DIR), or pass the MoE's directory.")
    check_context_length(cfg.model, cfg.loop.seq_len)
    check_output_dir(cfg.out, cfg.force)
    check_output_apart(cfg.out, tune_inputs(cfg), cfg.run_dir)
    engine = make_loop_engine(cfg.loop)
    try:
        return _tune(cfg, engine, show_progress)
    finally:
        engine.close()


def _tune(cfg: TuneConfig, engine: Engine, show_progress: bool) -> TuneResult:
    """Load, prepare the data mixture, train, and write the tuned MoE (rank 0)."""
    from transformers import AutoTokenizer

    save_dtype = resolve_save_dtype(cfg.loop.save_dtype, cfg.model)  # also validates the directory
    model = load_causal_lm(cfg.model, torch.float32)
    controller = RoutingController(model, cfg.routing, cfg.capacity_factor)
    if cfg.balance == "bias":
        refuse_bias_balancing(model, controller)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    cache_dir = (cfg.run_dir or cfg.out.parent) / ".cache" / "tokens"
    manifest = load_manifest(cfg.run_dir) if cfg.run_dir is not None else None
    with engine.main_process_first():  # rank 0 tokenises, the others read its stores
        domains = domains_data(tokenizer, cfg.data, cfg.val_data, cfg.loop.seq_len, cfg.val_fraction, cfg.text_field, cache_dir, manifest)
    if cfg.run_dir is not None and engine.is_main_process:
        record_heldout(cfg.run_dir, domains)
    ratios = cfg.mixture or {d: 1.0 for d in cfg.data}
    pool = MixtureBlocks({d: domain.train for d, domain in domains.items()}, ratios, cfg.loop.seed)
    eval_sets = {d: domain.heldout.head(cfg.loop.eval_blocks) for d, domain in domains.items() if len(domain.heldout)}
    kind = "none" if cfg.balance == "none" else cfg.balance
    objective = BalancedObjective(controller, BalanceSettings(kind, cfg.aux_coef, cfg.z_coef, cfg.balance_scope))
    work_dir = work_dir_for(cfg)
    options = cfg.model_dump(mode="json", include={"train", "balance", "aux_coef", "z_coef", "balance_scope", "routing", "capacity_factor"})
    options["mixture"] = {d: ratios[d] / sum(ratios.values()) for d in sorted(ratios)}  # as shares, however written
    job = LoopJob(
        model, pool, eval_sets, cfg.loop, work_dir, cfg.resume, "tune", show_progress,
        compute_loss=objective, trainable=trainable_predicate(cfg, controller), step_metrics=objective.step_metrics,
        fingerprint_extra={"tune": options}, eval_context=controller.native_routing, save_dtype=save_dtype,
    )
    result = run_loop(job, engine)
    controller.remove()
    saved = None
    if engine.is_main_process:
        assert result.state_dict is not None
        provenance = _add_provenance(cfg.model, cfg, result.last_row)
        saved = write_trained_model(cfg.out, cfg.model, model, result.state_dict, save_dtype, [work_dir / "metrics.jsonl"], cfg.force, provenance)
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
        if cfg.run_dir is not None:
            with updating_manifest(cfg.run_dir) as manifest:
                params = cfg.model_dump(mode="json", exclude={"force", "resume", "run_dir"})
                outputs = {"out": str(cfg.out), "eval_loss": result.eval, "saved_dtype": dtype_name(save_dtype), "unchanged_share": saved.unchanged_share}
                manifest.stages.append(StageRecord(stage="tune", params=params, outputs=outputs))
    engine.wait_for_everyone()
    return TuneResult(cfg.out, result.steps, result.resumed_from, result.last_row, result.eval, dtype_name(save_dtype), saved.unchanged_share if saved else None)
