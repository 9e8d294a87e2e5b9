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
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.arch import router_scoring, selection_bias_targets, stores_selection_bias
from moekit.config import TuneConfig
from moekit.data.blocks import MixtureBlocks
from moekit.data.domains import domains_data, record_heldout
from moekit.errors import InvalidOptionError, UnsupportedArchitectureError
from moekit.inspection.static import top_k_of
from moekit.io.atomic import check_output_apart, check_output_dir
from moekit.io.config_json import dtype_name
from moekit.io.loading import load_causal_lm
from moekit.manifest import StageRecord, load_manifest, now_iso, updating_manifest
from moekit.models import check_context_length, check_model_dir
from moekit.provenance import origin, read_provenance, recorded, write_provenance
from moekit.routing import balance as balance_metrics
from moekit.routing.bias import SelectionBias, find_selection_biases
from moekit.routing.control import RoutingController, RoutingSettings, is_training_only
from moekit.routing.objective import BalancedObjective, BalanceSettings, all_reduce_sum
from moekit.train.compute import training_flops
from moekit.train.engine import Engine
from moekit.train.loop import LoopJob, make_loop_engine, run_loop
from moekit.train.saving import resolve_save_dtype, write_trained_model


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


def work_dir_for(cfg: TuneConfig) -> Path:
    """Where checkpoints and metrics live while tuning: RUN_DIR/tune, or OUT.work next to OUT."""
    return cfg.run_dir / cfg.stage.replace(":", "-") if cfg.run_dir is not None else cfg.out.parent / f"{cfg.out.name}.work"


def is_routed_expert(name: str) -> bool:
    """Whether a parameter belongs to the routed experts (transformers 5 keeps them in an ``experts`` module;
    a Qwen2-MoE ``shared_expert`` is not one of them)."""
    return ".experts." in f"{name}."


def trainable_predicate(cfg: TuneConfig, controller: RoutingController, frozen: set[str] = frozenset(), new_expert: Any = None) -> Any:
    """Which parameters learn, by name (never those in ``frozen``, e.g. the selection biases).

    ``all`` (BTX); ``router``; ``router+attn`` (routers and attention only: embeddings, norms,
    LM head, experts and any shared expert stay frozen); ``all-but-experts`` (BTX's "frozen
    experts" ablation: everything but the routed experts learns); ``new-expert+router`` (the
    routers and the expert ``mix --add-expert`` added, by ``new_expert``). Noisy top-k's noise
    weights belong to the routers.
    """
    router_prefixes = tuple(f"{name}." for name, _ in controller.routers)
    if cfg.train == "all":
        chosen = lambda name: True  # noqa: E731
    elif cfg.train == "router":
        chosen = lambda name: name.startswith(router_prefixes)  # noqa: E731
    elif cfg.train == "all-but-experts":
        chosen = lambda name: not is_routed_expert(name)  # noqa: E731
    elif cfg.train == "new-expert+router":  # the routers and the expert mix --add-expert added (moekit.steps.tune_new_expert)
        chosen = lambda name: name.startswith(router_prefixes) or new_expert(name)  # noqa: E731
    else:
        chosen = lambda name: name.startswith(router_prefixes) or ".self_attn." in name  # noqa: E731
    return lambda name: name not in frozen and chosen(name)


def selection_bias(model: torch.nn.Module, controller: RoutingController, cfg: TuneConfig) -> SelectionBias:
    """The routers' selection biases for ``--balance bias``; a clear refusal for models without them."""
    biases = find_selection_biases(controller.routers)
    if biases is None:
        raise UnsupportedArchitectureError(
            f"--balance bias is refused for {model.config.model_type}: loss-free balancing learns a per-expert "
            "bias that changes which experts are selected, also at inference (DeepSeek-V3 stores it as "
            f"e_score_correction_bias), and {type(model).__name__}'s routers have no such tensor. The "
            "bias would be lost on export and the saved model would route differently from the tuned one.",
            f"Mix with {_bias_target_list()}, or use --balance switch (optionally with --balance-scope global) or --balance btx.",
        )
    return SelectionBias(biases, cfg.bias_rate, cfg.bias_rule)


def mixed_split(model_dir: Path) -> int:
    """The ``mix --split`` the MoE was built with (1 when unknown)."""
    split = recorded(model_dir, "split")
    return split if isinstance(split, int) and split > 0 else 1


def check_routing_mode(cfg: TuneConfig) -> None:
    """Refuse ablation modes that cannot mean what they say for this model and training choice."""
    if cfg.routing == "hash" and cfg.train == "router":
        raise InvalidOptionError(
            "--routing hash with --train router would train nothing: hash routing does not use the router.",
            "Use --train all or --train all-but-experts with hash routing.",
        )
    split = mixed_split(cfg.model)
    if split > 1 and cfg.routing in ("switch", "sample_top1"):
        raise InvalidOptionError(
            f"--routing {cfg.routing} sends each token to one expert, but {cfg.model} was mixed with --split {split}: "
            "one expert is a 1/{split} slice of an FFN, so top-1 routing would drop the rest of it.",
            "Use --routing topk, soft, noisy, expert_choice or hash for fine-grained MoEs.",
        )


def inference_routing(model_dir: Path) -> str:
    """How the saved model routes at inference, in words (its config's own rule; tune never changes it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    k = top_k_of(config)
    scoring = router_scoring(str(config.get("model_type", "")))
    rule = f"top-{k} of the router's {'sigmoid scores' if scoring == 'sigmoid' else 'softmax'}"
    if stores_selection_bias(str(config.get("model_type", ""))):
        rule += " plus the stored selection bias (e_score_correction_bias) for choosing experts"
    renormalised = config.get("norm_topk_prob", True)  # Mixtral-style families always renormalise and have no such key
    return rule + (", gate values renormalised over the chosen experts" if renormalised else ", gate values the chosen experts' raw scores")


def _bias_target_list() -> str:
    """``--target glm4_moe (llama, qwen2 seeds) or ...`` for the refusal of --balance bias."""
    return " or ".join(f"--target {name} ({', '.join(families)} seeds)" for name, families in selection_bias_targets().items())


def _add_provenance(model_dir: Path, cfg: TuneConfig, result_row: dict[str, Any], heldout: dict[str, Any]) -> Any:
    def add(tmp: Path) -> None:
        record = {
            "stage": "tune", "created": now_iso(), "from": str(model_dir), "data": cfg.data,
            "mixture": cfg.mixture or {d: 1 / len(cfg.data) for d in cfg.data}, "train": cfg.train,
            "balance": {"kind": cfg.balance, "aux_coef": cfg.aux_coef, "z_coef": cfg.z_coef, "scope": cfg.balance_scope,
                        **({"bias_rate": cfg.bias_rate, "bias_rule": cfg.bias_rule} if cfg.balance == "bias" else {})},
            "routing": cfg.routing, "inference_routing": inference_routing(cfg.model),
            "loop": cfg.loop.model_dump(mode="json"), "final": result_row, "heldout_routing": heldout,
        }
        write_provenance(tmp, {"tune": record}, read_provenance(model_dir))
        card = (model_dir / "README.md").read_text() if (model_dir / "README.md").is_file() else f"# {cfg.out.name}\n"
        budget = f"{cfg.loop.max_steps} steps" if cfg.loop.max_steps else f"{cfg.loop.max_tokens:,} tokens"
        balancing = "no balancing loss" if cfg.balance == "none" else f"{cfg.balance} balancing (coefficient {cfg.aux_coef}, {cfg.balance_scope} scope)"
        if cfg.balance == "bias":
            balancing = (f"loss-free balancing (selection bias, {cfg.bias_rule} rule, rate {cfg.bias_rate}"
                         + (f", sequence-wise aux loss {cfg.aux_coef})" if cfg.aux_coef else ")"))
        extras = (f", router z-loss {cfg.z_coef}" if cfg.z_coef else "") + (f", {cfg.routing} routing while training" if cfg.routing != "topk" else "")
        card += f"\n## Tuned\n\nFine-tuned by `moekit tune` ({cfg.train} parameters, {budget}) on {', '.join(cfg.data)} with {balancing}{extras}. Details: `moekit.yaml`.\n"
        card += f"\nRouting at inference: {inference_routing(model_dir)}"
        card += (f". `{cfg.routing}` routing was used only while training; no reader runs it at inference.\n" if cfg.routing != "topk" else ".\n")
        (tmp / "README.md").write_text(card)

    return add


def tune_inputs(cfg: TuneConfig) -> list[Path]:
    """Directories tune reads or that its input came from: the MoE, and the seed and branches it was mixed from.

    ``--out --force`` replaces the output; none of these may be, contain or lie inside it.
    """
    inputs = [Path(cfg.model)]
    record = origin(read_provenance(cfg.model), "seed")  # an unreadable one names no inputs
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
    check_routing_mode(cfg)
    model = load_causal_lm(cfg.model, torch.float32)
    scoring = router_scoring(str(model.config.model_type))
    assert cfg.capacity_factor is not None and cfg.aux_coef is not None  # filled in by TuneConfig
    controller = RoutingController(model, settings=RoutingSettings(cfg.routing, cfg.capacity_factor, scoring, cfg.temperature))
    bias = selection_bias(model, controller, cfg) if cfg.balance == "bias" else None
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
    objective = BalancedObjective(controller, BalanceSettings(cfg.balance, cfg.aux_coef, cfg.z_coef, cfg.balance_scope, scoring), bias)
    work_dir = work_dir_for(cfg)
    options = cfg.model_dump(mode="json", include={"train", "balance", "aux_coef", "z_coef", "balance_scope", "routing", "capacity_factor",
                                                   "bias_rate", "bias_rule", "temperature"})
    options["mixture"] = {d: ratios[d] / sum(ratios.values()) for d in sorted(ratios)}  # as shares, however written
    heldout: dict[str, Any] = {}
    frozen = set(bias.names) if bias is not None else set()
    new_expert, no_decay = None, (lambda name: False)
    if cfg.train == "new-expert+router":
        from moekit.steps.tune_new_expert import added_expert_index, new_expert_only

        new_expert, no_decay, _ = new_expert_only(model, added_expert_index(cfg.model), cfg.loop.shard)

    @contextlib.contextmanager
    def evaluation_routing() -> Iterator[None]:
        """Evaluate with the model's own routing, and keep the held-out assignment counts of every rank."""
        with controller.native_routing(), controller.counting() as counts:
            yield
        heldout["counts"] = all_reduce_sum(counts, engine.device)

    def on_step_start(step: int, steps: int) -> None:
        controller.progress = step / max(1, steps - 1)  # sample_top1's temperature schedule

    job = LoopJob(
        model, pool, eval_sets, cfg.loop, work_dir, cfg.resume, cfg.stage, show_progress,
        compute_loss=objective, trainable=trainable_predicate(cfg, controller, frozen, new_expert), step_metrics=objective.step_metrics,
        no_decay=no_decay,
        fingerprint_extra={"tune": options}, eval_context=evaluation_routing, save_dtype=save_dtype, on_step_start=on_step_start,
    )
    result = run_loop(job, engine)
    controller.remove()
    routing = heldout_summary(heldout.get("counts"))
    saved = None
    if engine.is_main_process:
        assert result.state_dict is not None
        state = {k: v for k, v in result.state_dict.items() if not is_training_only(k)}  # noisy top-k's W_noise is not part of the model
        provenance = _add_provenance(cfg.model, cfg, result.last_row, routing)
        saved = write_trained_model(cfg.out, cfg.model, model, state, save_dtype, [work_dir / "metrics.jsonl"], cfg.force, provenance)
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
        if cfg.run_dir is not None:
            with updating_manifest(cfg.run_dir) as manifest:
                params = cfg.model_dump(mode="json", exclude={"force", "resume", "run_dir", "stage"})
                flops = training_flops(cfg.model, result.tokens, cfg.loop.seq_len)
                outputs = {"out": str(cfg.out), "tokens": result.tokens, "flops": flops, "eval_loss": result.eval, "saved_dtype": dtype_name(save_dtype), "unchanged_share": saved.unchanged_share}
                manifest.stages.append(StageRecord(stage=cfg.stage, params=params, outputs=outputs))
    engine.wait_for_everyone()
    return TuneResult(cfg.out, result.steps, result.resumed_from, result.last_row, result.eval, dtype_name(save_dtype),
                      saved.unchanged_share if saved else None, routing)


def heldout_summary(counts: torch.Tensor | None) -> dict[str, Any]:
    """The final evaluation's routing: per-layer assignment counts and MaxVio over the held-out tokens (global: all ranks)."""
    if counts is None or not float(counts.sum()):
        return {}
    metrics = [balance_metrics.load_metrics(c) for c in counts]
    return {"counts": [[int(v) for v in layer] for layer in counts], "maxvio_mean": round(sum(m["maxvio"] for m in metrics) / len(metrics), 6),
            "maxvio_max": round(max(m["maxvio"] for m in metrics), 6), "dead_experts": sum(m["dead_experts"] for m in metrics)}
