"""``moekit mix``: merge dense branches (or copies of one seed) into one Hugging Face MoE.

Streaming design: the output's tensor list is planned from the input headers, the shard
writer writes each tensor as soon as it is computed, and inputs are read tensor by tensor
(plain positioned reads, row-chunked for large tensors). Global tensors come first, then each
layer: averaged tensors (fp32 weighted mean, cast once), the new router, the experts (each a
branch's FFN, copied file to file when it goes out unchanged), and the shared expert where the
target has one. Only the router's centroid initialisation keeps a layer's averaged tensors in
memory, to run that layer on calibration data.

Speed: the process does what a copy of its inputs does plus the averages. Configs are read as
JSON (``moekit.steps.mix.output``), the numbers are numpy (``moekit.steps.mix.tensors``), and
experts go file to file in the kernel, so neither transformers nor torch is imported unless
calibration or drop-upcycling needs them (see docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moekit.arch.base import DENSE_FFN_PROJECTIONS, LAYER_TENSOR, MoeTensor
from moekit.config import MixConfig
from moekit.io.atomic import check_free_space
from moekit.io.config_json import dtype_name
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.floats import CODES, from_float32, stored_dtype
from moekit.io.outputs import atomic_output_dir
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size
from moekit.manifest import StageRecord, updating_manifest
from moekit.progress import progress_bar
from moekit.provenance import write_provenance
from moekit.steps.mix.attention import (
    AttentionPlan,
    attention_plan,
    planned_layer,
    planned_router,
    write_expert_tensor,
)
from moekit.steps.mix.attention import write_router as write_attention_router
from moekit.steps.mix.experts import background_scans, write_experts, write_shared
from moekit.steps.mix.inputs import (
    TIED_HEAD,
    MixInputs,
    open_mix_inputs,
    redundant_tied_copies,
)
from moekit.steps.mix.output import build_moe_config, copy_modeling_files, write_model_card
from moekit.steps.mix.plan import BlockPlan, plan_block
from moekit.steps.mix.tensors import (
    CHUNK_ELEMENTS,
    average_rows,
    chunk_of,
    expert_ffn,
    random_router,
    seed_from,
    write_average,
)

_CHUNK_ELEMENTS = CHUNK_ELEMENTS  # averaging chunk size (values); read at each call, so tests can shrink it


@dataclass
class MixResult:
    """What ``mix`` wrote."""

    out: Path
    experts: list[str]
    moe_type: str
    num_tensors: int
    router_stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know about the MoE built


def _split_tensor_names(inputs: MixInputs) -> tuple[dict[str, str], dict[int, list[str]]]:
    """Global tensors (output name -> source name), and per layer the non-FFN tensor names (all sorted).

    A tied seed stores no LM head and neither does its MoE, unless the target's readers need an
    explicit one (``untied_head``): then the averaged embedding is written as ``lm_head.weight``.
    """
    globals_, per_layer = {}, {}
    skipped = redundant_tied_copies(inputs.seed.config, inputs.seed.tensors)  # a tied output stores no LM head
    for name in sorted(set(inputs.seed.tensors) - skipped):
        match = LAYER_TENSOR.match(name)
        if match is None:
            globals_[name] = name
        elif not inputs.adapter.is_ffn_tensor(match.group(2)):
            per_layer.setdefault(int(match.group(1)), []).append(name)
    if inputs.adapter.untied_head and TIED_HEAD not in globals_:
        globals_[TIED_HEAD] = inputs.adapter.embed_name
    return globals_, per_layer


def block_plan(inputs: MixInputs, cfg: MixConfig) -> BlockPlan:
    """The MoE block every layer gets (experts, widths, shared expert, scales)."""
    intermediate = inputs.seed.tensors[inputs.adapter.dense_ffn_name(0, "gate_proj")].shape[0]
    return plan_block(cfg, inputs.adapter, len(inputs.experts), intermediate)


def _moe_block(inputs: MixInputs, layer: int, plan: BlockPlan) -> list[MoeTensor]:
    hidden = inputs.seed.config["hidden_size"]
    dense = {p: inputs.seed.tensors[inputs.adapter.dense_ffn_name(layer, p)].shape for p in DENSE_FFN_PROJECTIONS}
    width = plan.expert_size
    experts = {
        "gate_proj": (width, dense["gate_proj"][1]),
        "up_proj": (width, dense["up_proj"][1]),
        "down_proj": (dense["down_proj"][0], width),
    }
    shared = dense if plan.shared_size is not None else None
    return inputs.adapter.moe_block_tensors(layer, plan.experts, experts, hidden, shared)


def _plan(inputs: MixInputs, dtype: str, plan: BlockPlan, attn: AttentionPlan | None) -> list[PlannedTensor]:
    """Every output tensor, in the order ``mix`` produces them."""
    seed = inputs.seed
    globals_, per_layer = _split_tensor_names(inputs)
    planned = [PlannedTensor(n, dtype, seed.tensors[source].shape) for n, source in globals_.items()]
    for layer in range(seed.config["num_hidden_layers"]):
        planned += planned_layer(inputs, per_layer.get(layer, []), dtype, attn)
        planned += [PlannedTensor(t.name, t.dtype or dtype, t.shape) for t in _moe_block(inputs, layer, plan)]
        if attn is not None:
            planned.append(planned_router(inputs, layer, dtype, attn))
    return planned


def _layer_router(
    layer: int, inputs: MixInputs, cfg: MixConfig, plan: BlockPlan, kept: dict[str, Any] | None, centroid: Any
) -> Any:
    """The new router of ``layer`` (fp32): centroid from calibration data (torch), or small random (numpy).

    One row per source FFN, repeated for each of its ``--split`` chunks (they are chosen together).
    """
    if centroid is not None and kept is not None:
        import torch

        for proj in DENSE_FFN_PROJECTIONS:  # the averaged dense FFN, for the calibration pass only
            name = inputs.adapter.dense_ffn_name(layer, proj)
            kept[name] = torch.from_numpy(np.concatenate(list(average_rows(inputs.average, name, _CHUNK_ELEMENTS))))
        rows = centroid.router_for_layer(layer, kept).numpy()
    else:
        std = cfg.router_std or float(inputs.seed.config.get("initializer_range", 0.02))
        rows = random_router(
            len(inputs.experts), inputs.seed.config["hidden_size"], std, seed_from(cfg.random_seed, layer, -1)
        )
    return np.repeat(rows, plan.split, axis=0) if plan.split > 1 else rows


def _mix_layer(
    layer: int,
    inputs: MixInputs,
    cfg: MixConfig,
    plan: BlockPlan,
    writer: StreamingShardWriter,
    code: str,
    names: list[str],
    centroid: Any,
    attn: AttentionPlan | None = None,
) -> None:
    """Write one layer: averaged tensors (or attention experts'), the MoE block tensor by tensor, the attention
    router."""
    kept: dict[str, Any] | None = {} if centroid is not None else None
    for name in names:
        role = attn.role(name) if attn is not None else None
        if role is None:
            write_average(writer, inputs, name, code, kept, _CHUNK_ELEMENTS)
        else:
            assert attn is not None
            write_expert_tensor(writer, inputs, name, role, code, attn, kept)
    _mix_block(layer, inputs, cfg, plan, writer, code, centroid, kept)
    if attn is not None:
        rows = centroid.attention_router(layer) if centroid is not None else None
        write_attention_router(writer, inputs, cfg, layer, code, attn, rows)


def _mix_block(
    layer: int,
    inputs: MixInputs,
    cfg: MixConfig,
    plan: BlockPlan,
    writer: StreamingShardWriter,
    code: str,
    centroid: Any,
    kept: dict[str, Any] | None,
) -> None:
    """Write one layer's MoE block: router, selection bias, experts, shared expert."""
    cache: dict[int, dict[str, Any]] = {}

    def ffn_of(expert: int) -> dict[str, Any]:
        source, chunk = plan.source_of(expert)
        if source not in cache:  # keep only the current source FFN: memory stays at one expert
            cache.clear()
            cache[source] = expert_ffn(inputs, cfg, layer, source, plan.down_scale)
        return chunk_of(cache[source], chunk, plan.split)

    for tensor in _moe_block(inputs, layer, plan):
        if tensor.role == "router":
            router = _layer_router(layer, inputs, cfg, plan, kept, centroid)
            code_here = tensor.dtype or code
            writer.write_array(tensor.name, code_here, from_float32(router, code_here))
            kept = None
        elif tensor.role == "selection_bias":  # no preference until tune --balance bias learns one
            writer.write_array(tensor.name, "F32", np.zeros(tensor.shape, dtype=np.float32))
        elif tensor.role in ("expert", "fused_gate_up", "fused_down"):
            write_experts(tensor, inputs, cfg, plan, layer, writer, code, ffn_of)
        elif tensor.role == "shared":
            write_shared(tensor, inputs, layer, writer, code, plan.shared_down_scale)
        elif tensor.role == "shared_gate":  # sigmoid(0) = 0.5 until trained
            writer.write_array(tensor.name, code, np.zeros(tensor.shape, dtype=stored_dtype(code)))
        else:
            raise ValueError(f"unknown MoE tensor role {tensor.role!r}")


def resolve_dtype(choice: str, inputs: MixInputs) -> str:
    """The output dtype as a safetensors code: the explicit choice, or the seed's."""
    return inputs.seed.dtype_code() if choice == "auto" else CODES[choice]


def mix(cfg: MixConfig, show_progress: bool = False) -> MixResult:
    """Merge the configured experts into an MoE checkpoint at ``cfg.out``; return what was written."""
    inputs = open_mix_inputs(cfg)
    code = resolve_dtype(cfg.dtype, inputs)
    max_shard = parse_size(cfg.shard_size)
    block = block_plan(inputs, cfg)
    attn = attention_plan(cfg, inputs)
    config_json = build_moe_config(inputs.seed.path, inputs.adapter, block, code, attention=attn)
    centroid = None
    if cfg.router == "centroid":
        from moekit.steps.mix.router import (
            prepare_centroid_init,  # torch and transformers: only for calibration
        )

        centroid = prepare_centroid_init(cfg, inputs)
        centroid.capture_attention = attn is not None
    plan = _plan(inputs, code, block, attn)
    check_free_space(cfg.out, sum(t.nbytes for t in plan))
    globals_, per_layer = _split_tensor_names(inputs)
    num_layers = inputs.seed.config["num_hidden_layers"]
    with atomic_output_dir(cfg.out, "model", force=cfg.force) as tmp, background_scans() as scans:
        # verbatim experts copy while averages compute
        writer = StreamingShardWriter(tmp, plan, max_shard, copy_workers=1)
        try:
            for name, source in globals_.items():
                needed = centroid is not None and name == inputs.adapter.embed_name
                kept: dict[str, Any] | None = {} if needed else None
                write_average(writer, inputs, source, code, kept, _CHUNK_ELEMENTS, out_name=name)
                if centroid is not None and kept is not None:
                    centroid.see_embedding(kept[source])
            with progress_bar("mixing layers", num_layers, show_progress) as advance:
                for layer in range(num_layers):
                    _mix_layer(layer, inputs, cfg, block, writer, code, per_layer.get(layer, []), centroid, attn)
                    advance()
            scans.finish()  # every verbatim copy checked for NaN/inf before the output is published
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            inputs.close()
        _write_metadata(tmp, cfg, inputs, block, config_json, code, centroid, attn)
    stats = centroid.summary() if centroid else {}
    result = MixResult(Path(cfg.out), expert_names(inputs, block), inputs.adapter.moe_type, len(plan), stats)
    if block.top_k >= block.experts:
        result.notes.append(
            f"Top-{block.top_k} of {block.experts} routed experts: every token takes every expert, so the routers only "
            "weigh them, and balancing (tune --balance, above all bias) has nothing to balance. For sparse routing, "
            f"mix with --top-k {max(1, block.experts - 1)} or less, or with more branches."
        )
    if cfg.run_dir is not None:
        _record_stage(cfg.run_dir, cfg, result)
    return result


def _record_stage(run_dir: Path, cfg: MixConfig, result: MixResult) -> None:
    params = cfg.model_dump(mode="json", exclude={"experts", "force", "run_dir"})
    with updating_manifest(run_dir) as manifest:
        manifest.stages.append(
            StageRecord(stage="mix", params=params, outputs={"out": str(result.out), "experts": result.experts})
        )


def expert_names(inputs: MixInputs, plan: BlockPlan) -> list[str]:
    """The routed experts' names in output order: the source's name, plus ``.N`` (the chunk) under ``--split``."""
    if plan.split == 1:
        return [e.name for e in inputs.experts]
    return [f"{e.name}.{c}" for e in inputs.experts for c in range(plan.split)]


def _write_metadata(
    tmp: Path,
    cfg: MixConfig,
    inputs: MixInputs,
    plan: BlockPlan,
    config_json: dict,
    dtype: str,
    centroid: Any,
    attn: AttentionPlan | None,
) -> None:
    import json

    (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_and_generation_files(inputs.seed.path, tmp)
    copy_modeling_files(inputs.adapter, tmp)
    router: dict[str, Any] = {
        "init": cfg.router,
        "top_k": plan.top_k,
        "scoring": inputs.adapter.scoring,
        "selection_bias": inputs.adapter.selection_bias is not None,
    }
    if cfg.router == "random":
        router["std"] = cfg.router_std or float(inputs.seed.config.get("initializer_range", 0.02))
    if centroid is not None:
        router.update(centroid.summary(), sharpness=cfg.router_sharpness, data=dict(cfg.router_data))
    record = {
        "stage": "mix",
        "mode": "upcycle" if cfg.upcycle else "btx",
        "seed": str(cfg.seed),
        "target": inputs.adapter.moe_type,
        "experts": [{"name": e.name, "kind": e.kind, "source": str(e.checkpoint.path)} for e in inputs.experts],
        "expert_names": expert_names(inputs, plan),
        "split": plan.split,
        "shared_expert": None if plan.shared_size is None else ("seed" if plan.seed_shared else "zero-output"),
        "scales": {
            "routed_config": plan.config_scale,
            "routed_down": plan.down_scale,
            "shared_down": plan.shared_down_scale,
        },
        "average": cfg.average if not cfg.upcycle else "seed",
        "average_weights": [round(w, 6) for _, w in inputs.average],
        "merge": {"method": cfg.merge, "density": cfg.merge_density, "scale": cfg.merge_scale},
        "dtype": dtype_name(dtype),
        "top_k": plan.top_k,
        "router": router,
        "upcycle": cfg.upcycle.model_dump() if cfg.upcycle else None,
        "expert_scale": cfg.expert_scale,
        "random_seed": cfg.random_seed,
        "attention_experts": None if attn is None else {**attn.config(), "names": [e.name for e in inputs.experts]},
    }
    write_provenance(tmp, record)
    write_model_card(tmp, record, inputs.adapter, Path(cfg.out).name)
