"""``moekit mix``: merge dense branches (or copies of one seed) into one Hugging Face MoE.

Streaming design: the output's tensor list is planned from the input headers, the shard
writer writes each tensor as soon as it is computed, and inputs are read tensor by tensor
(plain positioned reads, row-chunked for large tensors). Global tensors come first, then each layer: averaged tensors (fp32 weighted
mean, cast once), the new router, the experts (each a branch's FFN, unchanged up to the dtype
cast), and the shared expert where the target has one. Only the router's centroid
initialisation keeps a layer's averaged tensors in memory, to run that layer on calibration data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.arch.base import DENSE_FFN_PROJECTIONS, LAYER_TENSOR, MoeTensor
from moekit.config import MixConfig
from moekit.errors import NonFiniteError
from moekit.io.atomic import atomic_output_dir, check_free_space, check_output_dir
from moekit.io.checkpoint import Checkpoint
from moekit.io.config_json import dtype_name
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size
from moekit.manifest import StageRecord, updating_manifest
from moekit.progress import progress_bar
from moekit.routing.init import random_router
from moekit.steps.mix_inputs import MixInputs, open_mix_inputs, redundant_tied_copies
from moekit.steps.mix_output import build_moe_config, write_model_card, write_provenance
from moekit.steps.mix_router import CentroidInit, prepare_centroid_init

_CHUNK_ELEMENTS = 4 << 20  # values per averaging chunk (16 MB in fp32): bounds peak memory


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


def _plan(inputs: MixInputs, dtype: torch.dtype) -> list[PlannedTensor]:
    """Every output tensor, in the order ``mix`` produces them."""
    seed = inputs.seed
    globals_, per_layer = _split_tensor_names(inputs)
    plan = [PlannedTensor(n, dtype, seed.tensors[n].shape) for n in globals_]
    for layer in range(seed.config["num_hidden_layers"]):
        plan += [PlannedTensor(n, dtype, seed.tensors[n].shape) for n in per_layer.get(layer, [])]
        plan += [PlannedTensor(t.name, dtype, t.shape) for t in _moe_block(inputs, layer)]
    return plan


def _rng(*keys: int) -> torch.Generator:
    """A generator seeded from ``keys``, so each (seed, layer, expert) draw is independent of order."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def finite(tensor: torch.Tensor, name: str, checkpoint: Checkpoint) -> torch.Tensor:
    """``tensor`` itself; NonFiniteError if it holds NaN or infinite values (mix never writes those)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(
            f"Tensor {name} of {checkpoint.path} holds NaN or infinite values; a model mixed from it would be broken.",
            "That model is damaged (a diverged training run?): retrain it with a lower --lr, or leave it out.",
        )
    return tensor


def average_rows(sources: list[tuple[Checkpoint, float]], name: str) -> Iterator[torch.Tensor]:
    """Yield the weighted mean of tensor ``name`` over ``sources``, in row chunks.

    Chunks are fp32 and hold about ``_CHUNK_ELEMENTS`` values, so memory does not grow with the
    tensor (a 128k x 8k embedding is averaged in 16 MB pieces). A single source with weight 1
    (upcycling, ``--average seed``) is passed through in its stored dtype, bit for bit.
    """
    shape = sources[0][0].tensors[name].shape
    rows = shape[0] if shape else 1
    step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    (first, first_weight), *others = sources
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        chunk = finite(first.get_rows(name, start, stop), name, first)
        if not others and first_weight == 1.0:
            yield chunk
            continue
        total = chunk.to(torch.float32).mul_(first_weight)
        for checkpoint, weight in others:
            total.add_(finite(checkpoint.get_rows(name, start, stop), name, checkpoint), alpha=weight)  # bf16/fp16 promoted to fp32
        yield total


def _write_average(
    writer: StreamingShardWriter, inputs: MixInputs, name: str, dtype: torch.dtype, keep: dict[str, torch.Tensor] | None
) -> None:
    """Average tensor ``name`` into the writer, chunk by chunk; with ``keep``, also store it whole in fp32."""
    parts: list[torch.Tensor] = []

    def cast_chunks() -> Iterator[torch.Tensor]:
        for chunk in average_rows(inputs.average, name):
            if keep is not None:
                parts.append(chunk.to(torch.float32))
            yield chunk.to(dtype)

    shape = inputs.seed.tensors[name].shape
    writer.write_chunks(name, dtype, shape, cast_chunks())
    if keep is not None:
        keep[name] = torch.cat(parts).reshape(shape)


def _expert_ffn(inputs: MixInputs, cfg: MixConfig, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's gate/up/down weights: the source FFN, with drop-upcycling and output scaling.

    Unmodified tensors keep their stored dtype (no fp32 round trip); modified ones are fp32.
    Randomness is seeded per (random seed, layer, expert), so recomputing an expert gives the
    same tensors.
    """
    source = inputs.experts[expert]
    names = {p: inputs.adapter.dense_ffn_name(layer, p) for p in DENSE_FFN_PROJECTIONS}
    ffn = {p: finite(source.checkpoint.get(name), name, source.checkpoint) for p, name in names.items()}
    fraction = cfg.upcycle.drop_fraction if cfg.upcycle else 0.0
    if fraction > 0:
        # Drop-upcycling: re-draw a random share of intermediate units (rows of gate/up, columns
        # of down) from N(mean, std) of the original matrix, a different subset per expert.
        generator = _rng(cfg.random_seed, layer, expert)
        units = ffn["gate_proj"].shape[0]
        chosen = torch.randperm(units, generator=generator)[: int(round(fraction * units))]
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            weight = ffn[proj].to(torch.float32)
            shape = list(weight.shape)
            shape[dim] = len(chosen)
            fresh = torch.randn(shape, generator=generator) * weight.std() + weight.mean()
            ffn[proj] = weight.index_copy(dim, chosen, fresh)
    if cfg.expert_scale != 1.0:
        ffn["down_proj"] = ffn["down_proj"].to(torch.float32) * cfg.expert_scale  # output is linear in down_proj
    return ffn


def _layer_router(layer: int, inputs: MixInputs, cfg: MixConfig, kept: dict[str, torch.Tensor] | None, centroid: CentroidInit | None) -> torch.Tensor:
    """The new router of ``layer`` (fp32): centroid from calibration data, or small random."""
    if centroid is not None and kept is not None:
        for proj in DENSE_FFN_PROJECTIONS:  # the averaged dense FFN, for the calibration pass only
            name = inputs.adapter.dense_ffn_name(layer, proj)
            kept[name] = torch.cat(list(average_rows(inputs.average, name))).to(torch.float32)
        return centroid.router_for_layer(layer, kept)
    std = cfg.router_std or float(inputs.seed.config.get("initializer_range", 0.02))
    return random_router(len(inputs.experts), inputs.seed.config["hidden_size"], std, _rng(cfg.random_seed, layer, -1))


def _mix_layer(
    layer: int, inputs: MixInputs, cfg: MixConfig, writer: StreamingShardWriter, dtype: torch.dtype,
    names: list[str], centroid: CentroidInit | None,
) -> None:
    """Write one layer: averaged tensors, then the MoE block tensor by tensor."""
    kept: dict[str, torch.Tensor] | None = {} if centroid is not None else None
    for name in names:
        _write_average(writer, inputs, name, dtype, kept)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def ffn_of(expert: int) -> dict[str, torch.Tensor]:
        if expert not in cache:  # keep only the current expert: memory stays at one expert
            cache.clear()
            cache[expert] = _expert_ffn(inputs, cfg, layer, expert)
        return cache[expert]

    num_experts = len(inputs.experts)
    for tensor in _moe_block(inputs, layer):
        if tensor.role == "router":
            writer.write(tensor.name, _layer_router(layer, inputs, cfg, kept, centroid).to(dtype))
            kept = None
        elif tensor.role == "expert":
            assert tensor.expert is not None and tensor.projection is not None
            writer.write(tensor.name, ffn_of(tensor.expert)[tensor.projection].to(dtype))
        elif tensor.role == "fused_gate_up":
            chunks = (torch.cat([ffn_of(e)["gate_proj"], ffn_of(e)["up_proj"]]).to(dtype).unsqueeze(0) for e in range(num_experts))
            writer.write_chunks(tensor.name, dtype, tensor.shape, chunks)
        elif tensor.role == "fused_down":
            chunks = (ffn_of(e)["down_proj"].to(dtype).unsqueeze(0) for e in range(num_experts))
            writer.write_chunks(tensor.name, dtype, tensor.shape, chunks)
        elif tensor.role == "shared":
            # The shared expert starts as the seed's gate/up with down = 0: it adds exactly
            # nothing until trained, and its gradients are not zero.
            assert tensor.projection is not None
            source = inputs.seed.get(inputs.adapter.dense_ffn_name(layer, tensor.projection))
            writer.write(tensor.name, (torch.zeros_like(source) if tensor.projection == "down_proj" else source).to(dtype))
        elif tensor.role == "shared_gate":  # sigmoid(0) = 0.5 until trained
            writer.write(tensor.name, torch.zeros(tensor.shape, dtype=dtype))
        else:
            raise ValueError(f"unknown MoE tensor role {tensor.role!r}")


def resolve_dtype(choice: str, inputs: MixInputs) -> torch.dtype:
    """The output dtype: the explicit choice, or the seed's."""
    return inputs.seed.dtype() if choice == "auto" else getattr(torch, choice)


def mix(cfg: MixConfig, show_progress: bool = False) -> MixResult:
    """Merge the configured experts into an MoE checkpoint at ``cfg.out``; return what was written."""
    inputs = open_mix_inputs(cfg)
    dtype = resolve_dtype(cfg.dtype, inputs)
    max_shard = parse_size(cfg.shard_size)
    moe_config, config_json = build_moe_config(inputs.seed.path, inputs.adapter, len(inputs.experts), cfg.top_k, dtype)
    centroid = prepare_centroid_init(cfg, inputs) if cfg.router == "centroid" else None
    plan = _plan(inputs, dtype)
    check_output_dir(cfg.out, cfg.force)  # writable, and replaceable: before the free-space check and any work
    check_free_space(cfg.out, sum(t.nbytes for t in plan))
    globals_, per_layer = _split_tensor_names(inputs)
    num_layers = inputs.seed.config["num_hidden_layers"]
    with atomic_output_dir(cfg.out, force=cfg.force) as tmp:
        writer = StreamingShardWriter(tmp, plan, max_shard)
        try:
            for name in globals_:
                needed = centroid is not None and name == inputs.adapter.embed_name
                kept: dict[str, torch.Tensor] | None = {} if needed else None
                _write_average(writer, inputs, name, dtype, kept)
                if centroid is not None and kept is not None:
                    centroid.see_embedding(kept[name])
            with progress_bar("mixing layers", num_layers, show_progress) as advance:
                for layer in range(num_layers):
                    _mix_layer(layer, inputs, cfg, writer, dtype, per_layer.get(layer, []), centroid)
                    advance()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            inputs.close()
        _write_metadata(tmp, cfg, inputs, config_json, dtype, centroid)
    stats = centroid.summary() if centroid else {}
    result = MixResult(Path(cfg.out), [e.name for e in inputs.experts], inputs.adapter.moe_type, len(plan), stats)
    if cfg.run_dir is not None:
        _record_stage(cfg.run_dir, cfg, result)
    return result


def _record_stage(run_dir: Path, cfg: MixConfig, result: MixResult) -> None:
    params = cfg.model_dump(mode="json", exclude={"experts", "force", "run_dir"})
    with updating_manifest(run_dir) as manifest:
        manifest.stages.append(StageRecord(stage="mix", params=params, outputs={"out": str(result.out), "experts": result.experts}))


def _write_metadata(tmp: Path, cfg: MixConfig, inputs: MixInputs, config_json: dict, dtype: torch.dtype, centroid: CentroidInit | None) -> None:
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
