"""The numbers of ``mix``: averaged tensors, routers and transformed experts, in numpy.

Averages are fp32 weighted means computed in row chunks of about ``_CHUNK_ELEMENTS`` values, so
memory does not grow with the tensor (a 128k x 8k embedding is averaged in 16 MB pieces), then
stored in the output dtype (bf16 rounded to nearest even, as torch does: ``moekit.io.floats``).
No torch is imported on this path: it costs as much time as mixing a 600 MB model. torch comes in
only where it is needed: the centroid router's calibration and drop-upcycling's random units.

Every source chunk is checked for NaN/inf on its raw bits: mix never writes a broken model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from moekit.arch.base import DENSE_FFN_PROJECTIONS
from moekit.config import MixConfig
from moekit.errors import NonFiniteError
from moekit.io.checkpoint import Checkpoint
from moekit.io.floats import finite, from_float32, to_float32
from moekit.io.writer import StreamingShardWriter
from moekit.steps.mix.experts import verbatim_range
from moekit.steps.mix.inputs import MixInputs
from moekit.steps.mix.merge import MergeSpec, merge_chunk

CHUNK_ELEMENTS = 4 << 20  # values per averaging chunk (16 MB in fp32): bounds peak memory


def seed_from(*keys: int) -> int:
    """A 63-bit seed from ``keys``, so each (seed, layer, expert) draw is independent of order."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def checked(values: np.ndarray, code: str, name: str, checkpoint: Checkpoint) -> tuple[np.ndarray, str]:
    """``(values, code)``; NonFiniteError if the values hold NaN or infinity (mix never writes those)."""
    if not finite(values, code):
        raise NonFiniteError(
            f"Tensor {name} of {checkpoint.path} holds NaN or infinite values; a model mixed from it would be broken.",
            "That model is damaged (a diverged training run?): retrain it with a lower --lr, or leave it out.",
        )
    return values, code


def _identical(raw: list[tuple[np.ndarray, str]]) -> bool:
    """Whether every source chunk holds the same stored values (first row first: distinct inputs differ at once)."""
    (first, code), *others = raw
    return all(c == code and np.array_equal(a[:1], first[:1]) and np.array_equal(a, first) for a, c in others)


def average_rows(
    sources: list[tuple[Checkpoint, float]],
    name: str,
    chunk_elements: int = CHUNK_ELEMENTS,
    merge: MergeSpec | None = None,
    seed: Checkpoint | None = None,
) -> Iterator[np.ndarray]:
    """Yield the merge of tensor ``name`` over ``sources`` as float32 row chunks of about ``chunk_elements`` values.

    The plain weighted mean unless ``merge`` says otherwise (``moekit.steps.mix.merge``; those
    methods read the ``seed``'s tensor too). Equal weights are applied once, to the sum (for two
    sources (a + b) / 2 exactly). Chunks that are the same in every source (tensors that no branch
    trained, e.g. after ``train --train ffn``) are returned as they are, whatever the method:
    the merge of identical values is that value, exactly.
    """
    shape = sources[0][0].tensors[name].shape
    rows = shape[0] if shape else 1
    step = max(1, chunk_elements // max(1, math.prod(shape[1:])))
    (first, first_weight), *others = sources
    uniform = all(weight == first_weight for _, weight in others)
    for index, start in enumerate(range(0, rows, step)):
        stop = min(rows, start + step)
        raw = [(checkpoint.array_rows(name, start, stop), checkpoint.tensors[name].dtype) for checkpoint, _ in sources]
        if len(raw) > 1 and _identical(raw):
            yield to_float32(*checked(*raw[0], name, first))
            continue
        if merge is not None and merge.uses_seed:
            raw = [checked(values, code, name, checkpoint) for (values, code), (checkpoint, _) in zip(raw, sources)]
            assert seed is not None
            code = seed.tensors[name].dtype
            base = to_float32(*checked(seed.array_rows(name, start, stop), code, name, seed))
            yield merge_chunk(base, [to_float32(*r) for r in raw], [w for _, w in sources], merge, name, index)
            continue
        total: np.ndarray | None = None
        for (values_raw, code), (_, weight) in zip(raw, sources):
            values = to_float32(values_raw, code)
            if not uniform:
                values *= np.float32(weight)
            if total is None:
                total = values
            else:
                total += values
        assert total is not None
        if uniform and first_weight != 1.0:
            total *= np.float32(first_weight)
        if not finite(total, "F32"):  # NaN and inf propagate into the sum: only then look for the damaged input
            for (values, code), (checkpoint, _) in zip(raw, sources):
                checked(values, code, name, checkpoint)
            raise NonFiniteError(
                f"The mean of {name} overflows float32 (its inputs are finite but huge).",
                "The inputs hold values near the float32 limit: they are damaged; check them.",
            )
        yield total


def write_average(
    writer: StreamingShardWriter,
    inputs: MixInputs,
    name: str,
    code: str,
    keep: dict[str, Any] | None,
    chunk_elements: int = CHUNK_ELEMENTS,
    out_name: str | None = None,
) -> None:
    """Average tensor ``name`` into the writer (as ``out_name``, default the same), chunk by chunk.

    With ``keep``, also store it whole (fp32 torch, in the dense model's row order). A single
    source with weight 1 (upcycling, ``--average seed``) goes out bit for bit: copied file to file
    when the dtype stays, else converted. Rows the target orders differently (the adapter's
    ``dense_row_order``) are reordered, which needs the whole (small, attention) tensor at once.
    """
    shape = inputs.seed.tensors[name].shape
    out_name = out_name or name
    order = inputs.adapter.dense_row_order(name, inputs.seed.config)
    if keep is None and order is None and len(inputs.average) == 1 and inputs.average[0][1] == 1.0:
        part = verbatim_range(inputs.average[0][0], name, code)
        if part is not None:
            writer.copy_ranges(out_name, code, shape, [part])
            return
    parts: list[np.ndarray] = []

    def stored_chunks() -> Iterator[np.ndarray]:
        for chunk in average_rows(
            inputs.average, name, chunk_elements if order is None else math.prod(shape), inputs.merge, inputs.seed
        ):
            if keep is not None:
                parts.append(chunk)
            yield from_float32(chunk if order is None else chunk[order], code)

    writer.write_chunks(out_name, code, shape, stored_chunks())
    if keep is not None:
        import torch

        keep[name] = torch.from_numpy(np.concatenate(parts).reshape(shape))


def random_router(num_experts: int, hidden: int, std: float, seed: int) -> np.ndarray:
    """A [num_experts, hidden] fp32 router drawn from N(0, std^2); std must be > 0 (zeros tie every logit)."""
    if std <= 0:
        raise ValueError("router std must be positive")
    return (
        np.random.default_rng(seed).standard_normal((num_experts, hidden), dtype=np.float32) * np.float32(std)
    ).astype(np.float32)


def chunk_of(ffn: dict[str, Any], chunk: int, chunks: int) -> dict[str, Any]:
    """Chunk ``chunk`` of ``chunks`` of an FFN: gate/up rows and down columns of one 1/chunks slice of the units."""
    if chunks == 1:
        return ffn
    width = ffn["gate_proj"].shape[0] // chunks
    units = slice(chunk * width, (chunk + 1) * width)
    return {
        "gate_proj": ffn["gate_proj"][units],
        "up_proj": ffn["up_proj"][units],
        "down_proj": ffn["down_proj"][:, units].contiguous(),
    }


def expert_ffn(inputs: MixInputs, cfg: MixConfig, layer: int, expert: int, down_scale: float = 1.0) -> dict[str, Any]:
    """One source expert's gate/up/down weights as torch tensors: the source FFN, with drop-upcycling and output
    scaling.

    The computed path (experts that are not copied file to file). Unmodified tensors keep their
    stored dtype; modified ones are fp32. Randomness is seeded per (random seed, layer, expert),
    so recomputing an expert gives the same tensors. ``down_scale`` multiplies the down
    projection (``--expert-scale``, and the scales of ``moekit.steps.mix.plan``).
    """
    import torch

    source = inputs.experts[expert]
    names = {p: inputs.adapter.dense_ffn_name(layer, p) for p in DENSE_FFN_PROJECTIONS}
    ffn = {}
    for projection, name in names.items():
        code = source.checkpoint.tensors[name].dtype
        checked(
            source.checkpoint.array_rows(name, 0, source.checkpoint.tensors[name].shape[0]),
            code,
            name,
            source.checkpoint,
        )
        ffn[projection] = source.checkpoint.get(name)
    fraction = cfg.upcycle.drop_fraction if cfg.upcycle else 0.0
    if fraction > 0:
        # Drop-upcycling: re-draw a random share of intermediate units (rows of gate/up, columns
        # of down) from N(mean, std) of the original matrix, a different subset per expert.
        generator = torch.Generator().manual_seed(seed_from(cfg.random_seed, layer, expert))
        units = ffn["gate_proj"].shape[0]
        chosen = torch.randperm(units, generator=generator)[: int(round(fraction * units))]
        for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            weight = ffn[proj].to(torch.float32)
            shape = list(weight.shape)
            shape[dim] = len(chosen)
            fresh = torch.randn(shape, generator=generator) * weight.std() + weight.mean()
            ffn[proj] = weight.index_copy(dim, chosen, fresh)
    if down_scale != 1.0:
        ffn["down_proj"] = ffn["down_proj"].to(torch.float32) * down_scale  # output is linear in down_proj
    return ffn
