"""``moekit mix``: merge dense branches (or copies of one seed) into one Hugging Face MoE.

Streaming design: the output's tensor list is planned from the input headers, the shard
writer writes each tensor as soon as it is computed, and inputs are read tensor by tensor
(plain positioned reads, row-chunked for large tensors). Global tensors come first, then each
layer: averaged tensors (fp32 weighted mean, cast once), the new router, the experts (each a
branch's FFN, copied file to file when it goes out unchanged), and the shared expert where the
target has one. Only the router's centroid initialisation keeps a layer's averaged tensors in
memory, to run that layer on calibration data.

Speed: the process does what a copy of its inputs does plus the averages. Configs are read as
JSON (``moekit.steps.mix_output``), the numbers are numpy (``moekit.steps.mix_tensors``), and
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
from moekit.io.atomic import atomic_output_dir, check_free_space, check_output_dir
from moekit.io.config_json import dtype_name
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.floats import CODES, from_float32, stored_dtype
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size
from moekit.manifest import StageRecord, updating_manifest
from moekit.progress import progress_bar
from moekit.steps.mix_experts import write_experts, write_shared
from moekit.steps.mix_inputs import MixInputs, open_mix_inputs, redundant_tied_copies
from moekit.steps.mix_output import build_moe_config, write_model_card, write_provenance
from moekit.steps.mix_tensors import (
    CHUNK_ELEMENTS,
    average_rows,
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


def _split_tensor_names(inputs: MixInputs) -> tuple[list[str], dict[int, list[str]]]:
    """Global tensor names, and per layer the non-FFN tensor names (all sorted)."""
    globals_, per_layer = [], {}
    skipped = redundant_tied_copies(inputs.seed.config, inputs.seed.tensors)  # a tied output stores no LM head
    for name in sorted(set(inputs.seed.tensors) - skipped):
        match = LAYER_TENSOR.match(name)
        if match is None:
            globals_.append(name)
        elif not inputs.adapter.is_ffn_tensor(match.group(2)):
            per_layer.setdefault(int(match.group(1)), []).append(name)
    return globals_, per_layer


def _ffn_shapes(inputs: MixInputs, layer: int) -> dict[str, tuple[int, ...]]:
    return {p: inputs.seed.tensors[inputs.adapter.dense_ffn_name(layer, p)].shape for p in DENSE_FFN_PROJECTIONS}


def _moe_block(inputs: MixInputs, layer: int) -> list[MoeTensor]:
    hidden = inputs.seed.config["hidden_size"]
    return inputs.adapter.moe_block_tensors(layer, len(inputs.experts), _ffn_shapes(inputs, layer), hidden)


def _plan(inputs: MixInputs, dtype: str) -> list[PlannedTensor]:
    """Every output tensor, in the order ``mix`` produces them."""
    seed = inputs.seed
    globals_, per_layer = _split_tensor_names(inputs)
    plan = [PlannedTensor(n, dtype, seed.tensors[n].shape) for n in globals_]
    for layer in range(seed.config["num_hidden_layers"]):
        plan += [PlannedTensor(n, dtype, seed.tensors[n].shape) for n in per_layer.get(layer, [])]
        plan += [PlannedTensor(t.name, dtype, t.shape) for t in _moe_block(inputs, layer)]
    return plan


def _layer_router(layer: int, inputs: MixInputs, cfg: MixConfig, kept: dict[str, Any] | None, centroid: Any) -> Any:
    """The new router of ``layer`` (fp32): centroid from calibration data (torch), or small random (numpy)."""
    if centroid is not None and kept is not None:
        import torch

        for proj in DENSE_FFN_PROJECTIONS:  # the averaged dense FFN, for the calibration pass only
            name = inputs.adapter.dense_ffn_name(layer, proj)
            kept[name] = torch.from_numpy(np.concatenate(list(average_rows(inputs.average, name, _CHUNK_ELEMENTS))))
        return centroid.router_for_layer(layer, kept).numpy()
    std = cfg.router_std or float(inputs.seed.config.get("initializer_range", 0.02))
    return random_router(len(inputs.experts), inputs.seed.config["hidden_size"], std, seed_from(cfg.random_seed, layer, -1))


def _mix_layer(
    layer: int, inputs: MixInputs, cfg: MixConfig, writer: StreamingShardWriter, code: str, names: list[str], centroid: Any,
) -> None:
    """Write one layer: averaged tensors, then the MoE block tensor by tensor."""
    kept: dict[str, Any] | None = {} if centroid is not None else None
    for name in names:
        write_average(writer, inputs, name, code, kept, _CHUNK_ELEMENTS)
    cache: dict[int, dict[str, Any]] = {}

    def ffn_of(expert: int) -> dict[str, Any]:
        if expert not in cache:  # keep only the current expert: memory stays at one expert
            cache.clear()
            cache[expert] = expert_ffn(inputs, cfg, layer, expert)
        return cache[expert]

    for tensor in _moe_block(inputs, layer):
        if tensor.role == "router":
            router = _layer_router(layer, inputs, cfg, kept, centroid)
            writer.write_array(tensor.name, code, from_float32(router, code))
            kept = None
        elif tensor.role in ("expert", "fused_gate_up", "fused_down"):
            write_experts(tensor, inputs, cfg, layer, writer, code, ffn_of)
        elif tensor.role == "shared":
            write_shared(tensor, inputs, layer, writer, code)
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
    config_json = build_moe_config(inputs.seed.path, inputs.adapter, len(inputs.experts), cfg.top_k, code)
    centroid = None
    if cfg.router == "centroid":
        from moekit.steps.mix_router import (
            prepare_centroid_init,  # torch and transformers: only for calibration
        )

        centroid = prepare_centroid_init(cfg, inputs)
    plan = _plan(inputs, code)
    check_output_dir(cfg.out, cfg.force)  # writable, and replaceable: before the free-space check and any work
    check_free_space(cfg.out, sum(t.nbytes for t in plan))
    globals_, per_layer = _split_tensor_names(inputs)
    num_layers = inputs.seed.config["num_hidden_layers"]
    with atomic_output_dir(cfg.out, force=cfg.force) as tmp:
        writer = StreamingShardWriter(tmp, plan, max_shard)
        try:
            for name in globals_:
                needed = centroid is not None and name == inputs.adapter.embed_name
                kept: dict[str, Any] | None = {} if needed else None
                write_average(writer, inputs, name, code, kept, _CHUNK_ELEMENTS)
                if centroid is not None and kept is not None:
                    centroid.see_embedding(kept[name])
            with progress_bar("mixing layers", num_layers, show_progress) as advance:
                for layer in range(num_layers):
                    _mix_layer(layer, inputs, cfg, writer, code, per_layer.get(layer, []), centroid)
                    advance()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            inputs.close()
        _write_metadata(tmp, cfg, inputs, config_json, code, centroid)
    stats = centroid.summary() if centroid else {}
    result = MixResult(Path(cfg.out), [e.name for e in inputs.experts], inputs.adapter.moe_type, len(plan), stats)
    if cfg.run_dir is not None:
        _record_stage(cfg.run_dir, cfg, result)
    return result


def _record_stage(run_dir: Path, cfg: MixConfig, result: MixResult) -> None:
    params = cfg.model_dump(mode="json", exclude={"experts", "force", "run_dir"})
    with updating_manifest(run_dir) as manifest:
        manifest.stages.append(StageRecord(stage="mix", params=params, outputs={"out": str(result.out), "experts": result.experts}))


def _write_metadata(tmp: Path, cfg: MixConfig, inputs: MixInputs, config_json: dict, dtype: str, centroid: Any) -> None:
    import json

    (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_and_generation_files(inputs.seed.path, tmp)
    router: dict[str, Any] = {"init": cfg.router, "top_k": cfg.top_k}
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
        "average": cfg.average if not cfg.upcycle else "seed",
        "average_weights": [round(w, 6) for _, w in inputs.average],
        "dtype": dtype_name(dtype),
        "top_k": cfg.top_k,
        "router": router,
        "upcycle": cfg.upcycle.model_dump() if cfg.upcycle else None,
        "expert_scale": cfg.expert_scale,
        "random_seed": cfg.random_seed,
    }
    write_provenance(tmp, record)
    write_model_card(tmp, record, inputs.adapter, Path(cfg.out).name)
