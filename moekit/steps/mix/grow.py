"""``moekit mix --add-expert``: grow a built moekit MoE by one expert, the FFN of a new dense branch.

BTX's experts are independent: a new domain can be branched from the same seed later, trained on
its own, and joined to the MoE without touching what the MoE already learned (FlexOlmo,
Branch-Train-Stitch). So every tensor of the MoE goes out byte for byte as it is (copied file to
file), except three kinds that gain one expert:

* routers [E, H] -> [E+1, H]: the old rows' bytes, then the new row (``moekit.steps.mix.grow_router``:
  the centroid method against the existing rows, on calibration data run through the MoE);
* selection biases [E] -> [E+1]: the new expert gets the mean of the old biases (neither favoured
  nor held back relative to the average expert);
* stacked expert tensors [E, ...] -> [E+1, ...]: the old bytes, then the new expert's.

In per-expert layouts the new expert's tensors are new names; the branch's FFN goes in as stored
(copied file to file when the dtypes agree), its down projection times the MoE's routed-expert
scale so that it is on the same footing as the experts beside it. The config gains one expert
(top-k unchanged); provenance and model card record the added expert. The branch must come from
the MoE's seed (checked on the run manifests' seed records where both exist) and match its
shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moekit.arch.base import DENSE_FFN_PROJECTIONS
from moekit.config import GrowConfig
from moekit.data.sources import spec_paths
from moekit.errors import InvalidOptionError
from moekit.io.atomic import check_free_space
from moekit.io.checkpoint import Checkpoint
from moekit.io.config_json import dtype_name
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.floats import from_float32, to_float32
from moekit.io.outputs import atomic_output_dir, guard_output
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size
from moekit.manifest import StageRecord, load_manifest, updating_manifest
from moekit.progress import progress_bar
from moekit.provenance import write_provenance
from moekit.steps.mix.grow_inputs import GrowInputs, open_grow_inputs

Part = Any  # a byte range (path, offset, nbytes) or an array of the stored dtype


@dataclass
class GrowResult:
    """What ``mix --add-expert`` wrote."""

    out: Path
    experts: list[str]
    moe_type: str
    router_stats: dict[str, Any]
    notes: list[str]


def _grown_shape(name: str, shape: tuple[int, ...], inputs: GrowInputs) -> tuple[int, ...]:
    """The output shape of an MoE tensor: one expert more where the tensor is indexed by expert."""
    if name in inputs.by_expert:
        if (
            len(shape) == 2
            and shape[0] == 1
            and inputs.adapter.selection_bias_rows
            and name.endswith(str(inputs.adapter.selection_bias))
        ):
            return (1, shape[1] + 1)
        return (shape[0] + 1, *shape[1:])
    return shape


def _stored_order(checkpoint: Checkpoint) -> list[str]:
    """Tensor names in file order: the copy reads each shard front to back."""
    return sorted(checkpoint.tensors, key=lambda n: (checkpoint.tensors[n].shard, checkpoint.tensors[n].offset))


def _new_expert_names(inputs: GrowInputs, layer: int) -> dict[str, str]:
    """Per-expert layouts: the new expert's tensor names by dense projection."""
    return {p: inputs.adapter.expert_name(layer, inputs.experts, p) for p in DENSE_FFN_PROJECTIONS}


def plan_grown(inputs: GrowInputs) -> list[PlannedTensor]:
    """Every output tensor in write order: the MoE's (in file order, grown where indexed by expert), then the new
    expert's."""
    moe = inputs.moe
    planned = [
        PlannedTensor(n, moe.tensors[n].dtype, _grown_shape(n, moe.tensors[n].shape, inputs))
        for n in _stored_order(moe)
    ]
    if inputs.adapter.fused_experts is None:
        for layer in inputs.layers:
            for projection, name in _new_expert_names(inputs, layer).items():
                code = moe.tensors[inputs.adapter.expert_name(layer, 0, projection)].dtype
                planned.append(
                    PlannedTensor(
                        name, code, inputs.branch.tensors[inputs.adapter.dense_ffn_name(layer, projection)].shape
                    )
                )
    return planned


def _new_ffn_part(inputs: GrowInputs, layer: int, projection: str, code: str) -> Part:
    """The branch's ``projection`` of ``layer`` for the new expert: a byte range where it goes out as stored, else an
    array."""
    from moekit.steps.mix.experts import scaled_part

    scale = inputs.down_scale if projection == "down_proj" else 1.0
    return scaled_part(
        inputs.branch,
        inputs.adapter.dense_ffn_name(layer, projection),
        code,
        scale,
        "That branch is damaged (a diverged training run?): retrain it with a lower --lr.",
    )


def _moe_range(inputs: GrowInputs, name: str) -> tuple[Path, int, int]:
    info = inputs.moe.tensors[name]
    return inputs.moe.path / info.shard, info.offset, info.nbytes


def _write_grown(inputs: GrowInputs, writer: StreamingShardWriter, planned: PlannedTensor, rows: np.ndarray) -> None:
    """Write one of the MoE's tensors: copied as stored, or grown by the new expert's part."""
    role = inputs.by_expert.get(planned.name)
    if role is None:
        writer.copy_ranges(planned.name, planned.code, planned.shape, [_moe_range(inputs, planned.name)])
        return
    layer, kind = role
    info = inputs.moe.tensors[planned.name]
    if kind == "router":  # the old rows' bytes, then the new row in the router's stored dtype
        old = inputs.moe.array_rows(planned.name, 0, info.shape[0])
        new = from_float32(rows[inputs.layers.index(layer)][None, :], info.dtype)
        writer.write_array(planned.name, info.dtype, np.concatenate([old, new]))
    elif kind == "selection_bias":
        old = to_float32(inputs.moe.array_rows(planned.name, 0, info.shape[0]), info.dtype)
        grown = np.concatenate([old, np.full(old.shape[:-1] + (1,), old.mean(), dtype=np.float32)], axis=-1)
        writer.write_array(planned.name, info.dtype, from_float32(grown, info.dtype))
    elif kind == "fused_gate_up":  # [E+1, 2I, H]: each expert's gate rows, then its up rows
        parts = [_new_ffn_part(inputs, layer, p, info.dtype) for p in ("gate_proj", "up_proj")]
        writer.write_parts(planned.name, info.dtype, planned.shape, [_moe_range(inputs, planned.name), *parts])
    else:  # fused_down [E+1, H, I]
        writer.write_parts(
            planned.name,
            info.dtype,
            planned.shape,
            [_moe_range(inputs, planned.name), _new_ffn_part(inputs, layer, "down_proj", info.dtype)],
        )


def grown_config(inputs: GrowInputs) -> dict[str, Any]:
    """The MoE's config.json with one expert more (every expert-count key the family's readers use)."""
    config = json.loads((inputs.moe.path / "config.json").read_text(encoding="utf-8"))
    for key in inputs.adapter.num_experts_keys:
        config[key] = inputs.experts + 1
    return config


def calibration_blocks(cfg: GrowConfig, tokenizer: Any) -> dict[str, Any]:
    """Token blocks per domain: --router-data, else the run's branch data; the new domain's and at least one other."""
    from moekit.data import evaluation_blocks

    specs: dict[str, list[str]] = {d: [p] for d, p in cfg.router_data.items()}
    if not specs and cfg.run_dir is not None:
        specs = {n: r.data for n, r in load_manifest(cfg.run_dir).branches.items() if r.data}
    if cfg.name not in specs:
        raise InvalidOptionError(
            f"The new expert's router row needs calibration data of its domain '{cfg.name}'.",
            f"Pass --router-data {cfg.name}=PATH (or train the branch in the run directory, whose data is then used), "
            "or start the row without data: --router mean (the mean of the existing rows).",
        )
    if len(specs) < 2:
        raise InvalidOptionError(
            "The new router row is placed against the existing experts, which needs data of at least one "
            "existing domain too.",
            "Add --router-data NAME=PATH for a domain the MoE already serves, or start the row without data: --router "
            "mean.",
        )
    return {d: evaluation_blocks(tokenizer, s, cfg.router_block_size, cfg.router_tokens) for d, s in specs.items()}


def _mean_rows(inputs: GrowInputs) -> Any:
    """The new row of every MoE layer as the mean of its existing rows (fp32): an "average" expert whose logit is
    the mean of the others' for every token, until tune teaches the router when to choose it."""
    from moekit.steps.mix.grow_router import AddedRows

    names = {layer: name for name, (layer, kind) in inputs.by_expert.items() if kind == "router"}
    rows = []
    for layer in inputs.layers:
        info = inputs.moe.tensors[names[layer]]
        rows.append(to_float32(inputs.moe.array_rows(names[layer], 0, info.shape[0]), info.dtype).mean(axis=0))
    return AddedRows(np.stack(rows).astype(np.float32), init="mean")


def _router_rows(cfg: GrowConfig, inputs: GrowInputs) -> Any:
    from moekit.models import load_tokenizer
    from moekit.steps.mix.grow_router import added_router_rows

    if cfg.router == "mean":
        return _mean_rows(inputs)
    blocks = calibration_blocks(cfg, load_tokenizer(inputs.moe.path))
    biases = None
    if inputs.adapter.selection_bias is not None:
        biases = [
            to_float32(
                inputs.moe.array_rows(n, 0, inputs.moe.tensors[n].shape[0]), inputs.moe.tensors[n].dtype
            ).reshape(-1)
            for n in (inputs.adapter.selection_bias_name(layer) for layer in inputs.layers)
            if n is not None
        ]
    top_k = int(inputs.moe.config.get(inputs.adapter.top_k_key) or 1)
    return added_router_rows(inputs.moe.path, cfg.name, blocks, inputs.adapter.scoring, top_k, biases)


def add_expert(cfg: GrowConfig, show_progress: bool = False) -> GrowResult:
    """Write the MoE at ``cfg.into`` grown by the FFN of ``cfg.branch`` as expert ``cfg.name`` to ``cfg.out``."""
    from moekit.steps.mix.experts import background_scans

    inputs = open_grow_inputs(cfg)
    try:
        read = [inputs.moe.path, inputs.branch.path, *spec_paths(cfg.router_data.values())]
        guard_output(cfg.out, "model", cfg.force, read, cfg.run_dir)
        added = _router_rows(cfg, inputs)
        planned = plan_grown(inputs)
        check_free_space(cfg.out, sum(t.nbytes for t in planned))
        names = [*[str(n) for n in inputs.model_record["expert_names"]], cfg.name]
        with atomic_output_dir(cfg.out, "model", force=cfg.force) as tmp, background_scans() as scans:
            writer = StreamingShardWriter(tmp, planned, parse_size(cfg.shard_size), copy_workers=1)
            try:
                moe_tensors = len(inputs.moe.tensors)
                with progress_bar("adding the expert", len(planned), show_progress) as advance:
                    for index, tensor in enumerate(planned):
                        if index < moe_tensors:
                            _write_grown(inputs, writer, tensor, added.rows)
                        else:
                            layer, projection = _new_tensor_origin(inputs, tensor.name)
                            writer.write_parts(
                                tensor.name,
                                tensor.code,
                                tensor.shape,
                                [_new_ffn_part(inputs, layer, projection, tensor.code)],
                            )
                        advance()
                scans.finish()
                writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_metadata(tmp, cfg, inputs, names, added.summary())
    finally:
        inputs.close()
    result = GrowResult(Path(cfg.out), names, inputs.adapter.moe_type, added.summary(), inputs.notes)
    if cfg.run_dir is not None:
        with updating_manifest(cfg.run_dir) as manifest:
            params = cfg.model_dump(mode="json", exclude={"force", "run_dir"})
            manifest.stages.append(
                StageRecord(stage="add-expert", params=params, outputs={"out": str(result.out), "experts": names})
            )
    return result


def _new_tensor_origin(inputs: GrowInputs, name: str) -> tuple[int, str]:
    for layer in inputs.layers:
        for projection, new_name in _new_expert_names(inputs, layer).items():
            if new_name == name:
                return layer, projection
    raise ValueError(f"{name} is not a tensor of the new expert")


def _write_metadata(tmp: Path, cfg: GrowConfig, inputs: GrowInputs, names: list[str], router: dict[str, Any]) -> None:
    from moekit.steps.mix.output import write_model_card

    config = grown_config(inputs)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_and_generation_files(inputs.moe.path, tmp)
    found = inputs.model_record
    experts = [
        *(found.get("experts") or []),
        {"name": cfg.name, "kind": "branch", "source": str(Path(cfg.branch).absolute())},
    ]
    record = {
        "stage": "add-expert",
        "mode": found.get("mode", "btx"),
        "seed": found.get("seed"),
        "target": inputs.adapter.moe_type,
        "experts": experts,
        "expert_names": names,
        "added": {
            "name": cfg.name,
            "source": str(Path(cfg.branch).absolute()),
            "into": str(Path(cfg.into).absolute()),
            "expert_index": inputs.experts,
            "down_scale": inputs.down_scale,
        },
        "split": 1,
        "shared_expert": found.get("shared_expert"),
        "scales": found.get("scales"),
        "average": found.get("average", "uniform"),
        "merge": found.get("merge"),
        "dtype": dtype_name(inputs.moe.dtype_code()),
        "top_k": int(inputs.moe.config.get(inputs.adapter.top_k_key) or 1),
        "router": {
            "top_k": found.get("router", {}).get("top_k"),
            "scoring": inputs.adapter.scoring,
            **router,
            "init": "centroid against the existing rows (new row only)"
            if cfg.router == "calibrated"
            else "the mean of the existing rows (new row only)",
        },
    }
    write_provenance(tmp, record, inputs.record)
    write_model_card(tmp, record, inputs.adapter, Path(cfg.out).name)
    if cfg.router == "calibrated":
        row = (
            "the centroid method against the existing rows: at the start "
            f"{router['init_new_domain_top_k']:.0%} of {cfg.name} tokens and {router['init_old_domains_top_k']:.0%} "
            f"of the other domains' tokens have it in their top-{record['top_k']}"
        )
    else:
        row = "the mean of each layer's existing rows, without calibration data"
    with open(tmp / "README.md", "a", encoding="utf-8") as card:
        card.write(
            f"\n## Grown\n\nExpert {inputs.experts} (`{cfg.name}`) was added by `moekit mix --add-expert` to "
            f"`{cfg.into}`: every tensor of that MoE is kept byte for byte; routers gained one row ({row}). Tune "
            "the router (`moekit tune --train router`) before judging it.\n"
        )
