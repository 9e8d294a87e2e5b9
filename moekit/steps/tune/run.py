"""``moekit tune``: train the mixed MoE (router first of all) with load balancing (BTX's MoE finetuning).

The data is a mixture of domains with set shares. ``train`` selects what learns: everything
(BTX), only the routers, or routers and attention (BTX found freezing experts costs nothing).
Balancing terms (Switch aux loss or BTX's gate-value variant, router z-loss, micro or global
batch scope) are added to the LM loss and reported by name with per-step load metrics; on
targets with a selection bias, loss-free balancing learns that bias instead (exported with the
weights). Ablation routing rules (``moekit.routing.modes``) can replace the model's own while
training. It reuses the training loop of ``train`` (resume, DDP/FSDP2) and writes the same HF MoE
format, with the config's routing settings unchanged; the held-out routing of the final
evaluation (per-layer assignment counts, MaxVio) is recorded in ``moekit.yaml``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.arch import router_scoring
from moekit.config import TuneConfig
from moekit.data.domains import DomainData, domains_data, heldout_sets, record_heldout, training_mixture
from moekit.io.config_json import dtype_name
from moekit.io.loading import load_causal_lm
from moekit.io.locks import exclusive
from moekit.io.outputs import guard_output
from moekit.manifest import StageRecord, load_manifest, updating_manifest
from moekit.models import check_model_dir, fit_context_length
from moekit.routing.attention_stats import AttentionRoutingStats
from moekit.routing.control import RoutingController, RoutingSettings, find_attention_routers, is_training_only
from moekit.routing.objective import BalancedObjective, BalanceSettings, all_reduce_sum
from moekit.steps.tune.hypermoe import add_hypermoe, check_hypermoe_training, has_hypermoe, hypermoe_record
from moekit.steps.tune.inputs import check_routing_mode, lock_path, tune_inputs, work_dir_for
from moekit.steps.tune.record import heldout_summary, provenance_writer
from moekit.steps.tune.trainable import selection_bias, trainable_predicate
from moekit.train.compute import training_flops
from moekit.train.engine import Engine
from moekit.train.loop import LoopJob, LoopResult, is_main_process, make_loop_engine, run_loop
from moekit.train.saving import SavedModel, resolve_save_dtype, write_trained_model


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
    heldout_routing: dict[str, Any] = field(default_factory=dict)  # the final evaluation's routing (counts, MaxVio)


def tune(cfg: TuneConfig, show_progress: bool = True) -> TuneResult:
    """Tune the MoE at ``cfg.model`` on the data mixture and write it to ``cfg.out``."""
    check_model_dir(
        cfg.model, "The MoE to tune,", "Mix the branches first (moekit mix RUN_DIR), or pass the MoE's directory."
    )
    fit_context_length([cfg.model], cfg.loop)
    guard_output(cfg.out, "model", cfg.force, tune_inputs(cfg), cfg.run_dir)
    with contextlib.ExitStack() as held:
        if is_main_process():  # one job per output: a second tune into the same output is refused
            held.enter_context(exclusive(lock_path(cfg), f"The tune output {cfg.out}"))
        engine = make_loop_engine(cfg.loop, cfg.device)
        try:
            return _tune(cfg, engine, show_progress)
        finally:
            engine.close()


def _tune(cfg: TuneConfig, engine: Engine, show_progress: bool) -> TuneResult:
    """Load, prepare the data mixture, train, and write the tuned MoE (rank 0)."""
    save_dtype = resolve_save_dtype(cfg.loop.save_dtype, cfg.model)  # also validates the directory
    check_routing_mode(cfg)
    model = load_causal_lm(cfg.model, torch.float32)
    if cfg.hypermoe is not None:
        add_hypermoe(model, cfg)  # before the loop: a resumed run loads its checkpoint into these modules
    check_hypermoe_training(model, cfg)
    scoring = router_scoring(str(model.config.model_type))
    assert cfg.capacity_factor is not None and cfg.aux_coef is not None  # filled in by TuneConfig
    controller = RoutingController(
        model,
        settings=RoutingSettings(cfg.routing, cfg.capacity_factor, scoring, cfg.temperature, cfg.router_jitter or 0.0),
    )
    bias = selection_bias(model, controller, cfg) if cfg.balance == "bias" else None
    domains = _tune_data(cfg, engine)
    objective = BalancedObjective(
        controller, BalanceSettings(cfg.balance, cfg.aux_coef, cfg.z_coef, cfg.balance_scope, scoring), bias
    )
    heldout: dict[str, Any] = {}
    attention = AttentionRoutingStats(find_attention_routers(model), engine.device)
    job = _loop_job(cfg, model, controller, domains, objective, engine, heldout, show_progress, attention)
    job.save_dtype = save_dtype
    result = run_loop(job, engine)
    controller.remove()
    attention.remove()
    routing = heldout_summary(heldout.get("counts"))
    saved = _save(cfg, model, result, save_dtype, routing) if engine.is_main_process else None
    engine.wait_for_everyone()
    return TuneResult(
        cfg.out,
        result.steps,
        result.resumed_from,
        result.last_row,
        result.eval,
        dtype_name(save_dtype),
        saved.unchanged_share if saved else None,
        routing,
    )


def _tune_data(cfg: TuneConfig, engine: Engine) -> dict[str, DomainData]:
    """Each domain's training and held-out blocks (stores prepared by rank 0 first; the split recorded in the run)."""
    from moekit.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    cache_dir = (cfg.run_dir or cfg.out.parent) / ".cache" / "tokens"
    manifest = load_manifest(cfg.run_dir) if cfg.run_dir is not None else None
    with engine.main_process_first():  # rank 0 tokenises, the others read its stores
        domains = domains_data(
            tokenizer, cfg.data, cfg.val_data, cfg.loop.seq_len, cfg.val_fraction, cfg.text_field, cache_dir, manifest
        )
    if cfg.run_dir is not None and engine.is_main_process:
        record_heldout(cfg.run_dir, domains)
    return domains


def _loop_job(
    cfg: TuneConfig,
    model: torch.nn.Module,
    controller: RoutingController,
    domains: dict[str, DomainData],
    objective: BalancedObjective,
    engine: Engine,
    heldout: dict[str, Any],
    show_progress: bool,
    attention: AttentionRoutingStats,
) -> LoopJob:
    """The training loop's job: the data mixture, what trains, the balancing objective, evaluation with the model's
    own routing."""
    ratios = cfg.mixture or {d: 1.0 for d in cfg.data}
    pool = training_mixture(domains, ratios, cfg.loop.seed)
    eval_sets = heldout_sets(domains, cfg.loop.eval_blocks)
    options = cfg.model_dump(
        mode="json",
        include={
            "train",
            "balance",
            "aux_coef",
            "z_coef",
            "balance_scope",
            "routing",
            "capacity_factor",
            "bias_rate",
            "bias_rule",
            "temperature",
        },
    )
    options["mixture"] = {d: ratios[d] / sum(ratios.values()) for d in sorted(ratios)}  # as shares, however written
    if cfg.router_jitter:  # only when on: checkpoints of runs without it keep their recorded options
        options["router_jitter"] = cfg.router_jitter
    if cfg.hypermoe is not None:
        options["hypermoe"] = cfg.hypermoe.model_dump()
    frozen = set(objective.bias.names) if objective.bias is not None else set()
    new_expert, no_decay = None, (lambda name: False)
    if cfg.train == "new-expert+router":
        from moekit.steps.tune.new_expert import added_expert_index, new_expert_only

        new_expert, no_decay, _ = new_expert_only(model, added_expert_index(cfg.model), cfg.loop.shard)

    @contextlib.contextmanager
    def evaluation_routing() -> Iterator[None]:
        """Evaluate with the model's own routing, and keep the held-out assignment counts of every rank."""
        with controller.native_routing(), controller.counting() as counts:
            yield
        heldout["counts"] = all_reduce_sum(counts, engine.device)

    def on_step_start(step: int, steps: int) -> None:
        controller.progress = step / max(1, steps - 1)  # sample_top1's temperature schedule

    return LoopJob(
        model,
        pool,
        eval_sets,
        cfg.loop,
        work_dir_for(cfg),
        cfg.resume,
        cfg.stage,
        show_progress,
        compute_loss=objective,
        trainable=trainable_predicate(cfg, controller, frozen, new_expert, find_attention_routers(model)),
        step_metrics=lambda: {**objective.step_metrics(), **attention.step_metrics()},
        no_decay=no_decay,
        fingerprint_extra={"tune": options},
        eval_context=evaluation_routing,
        on_step_start=on_step_start,
    )


def _save(
    cfg: TuneConfig, model: torch.nn.Module, result: LoopResult, save_dtype: torch.dtype, routing: dict[str, Any]
) -> SavedModel:
    """Write the tuned MoE (with provenance and model card), drop the checkpoints, record the stage in the run."""
    assert result.state_dict is not None
    work_dir = work_dir_for(cfg)
    state = {
        k: v for k, v in result.state_dict.items() if not is_training_only(k)
    }  # noisy top-k's W_noise is not part of the model
    provenance = provenance_writer(cfg.model, cfg, result.last_row, routing, hypermoe_record(model))
    extra = [work_dir / "metrics.jsonl"]
    if has_hypermoe(model):  # this moekit's modeling code, which has HyperMoE (the input's copy may predate it)
        from moekit.modeling import modeling_files

        extra += modeling_files()
    saved = write_trained_model(cfg.out, cfg.model, model, state, save_dtype, extra, cfg.force, provenance)
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    if cfg.run_dir is not None:
        with updating_manifest(cfg.run_dir) as manifest:
            params = cfg.model_dump(mode="json", exclude={"force", "resume", "run_dir", "stage"})
            flops = training_flops(cfg.model, result.tokens, cfg.loop.seq_len)
            outputs = {
                "out": str(cfg.out),
                "tokens": result.tokens,
                "flops": flops,
                "eval_loss": result.eval,
                "saved_dtype": dtype_name(save_dtype),
                "unchanged_share": saved.unchanged_share,
            }
            manifest.stages.append(StageRecord(stage=cfg.stage, params=params, outputs=outputs))
    return saved
