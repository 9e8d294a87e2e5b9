"""Writing a layer's MoE block: experts copied file to file where they go out unchanged.

Most of a mixed model's bytes are expert weights that are a branch's FFN exactly (same dtype, no
drop-upcycling, no output scaling). Those are copied from the input file to the output file in
the kernel (``StreamingShardWriter.copy_ranges``), never through Python buffers; they are checked
for NaN/inf on disk first (an exponent-bit scan of a memory map). Experts that are transformed,
or cast to another dtype, are computed and written as tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from moekit.arch.base import MoeTensor, row_slice
from moekit.config import MixConfig
from moekit.errors import NonFiniteError
from moekit.io.checkpoint import Checkpoint, dtype_code, finite_on_disk
from moekit.io.floats import stored_dtype
from moekit.io.writer import StreamingShardWriter
from moekit.steps.mix.inputs import MixInputs
from moekit.steps.mix.plan import BlockPlan

Range = tuple[Path, int, int]


def _non_finite(name: str, checkpoint: Checkpoint) -> NonFiniteError:
    return NonFiniteError(
        f"Tensor {name} of {checkpoint.path} holds NaN or infinite values; a model mixed from it would be broken.",
        "That model is damaged (a diverged training run?): retrain it with a lower --lr, or leave it out.",
    )


class FiniteScans:
    """NaN/inf scans of verbatim-copied tensors, run on a second thread while the copies go on.

    The scan of a memory map (numpy, GIL released) overlaps the in-kernel copies and the averaging
    of the main thread. ``finish`` waits for every scan and raises for the first damaged tensor;
    ``mix`` calls it before the output directory is published, so a damaged input still leaves
    nothing on disk.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-scan")
        self._pending: list[tuple[Any, str, Checkpoint]] = []

    def submit(self, path: Path, info: Any, name: str, checkpoint: Checkpoint) -> None:
        """Queue the scan of one stored tensor."""
        self._pending.append((self._pool.submit(finite_on_disk, path, info), name, checkpoint))

    def finish(self) -> None:
        """Wait for every scan; NonFiniteError naming the first tensor that holds NaN or inf."""
        try:
            for future, name, checkpoint in self._pending:
                if not future.result():
                    raise _non_finite(name, checkpoint)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the scan thread (pending scans are dropped)."""
        for future, _, _ in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


_SCANS: ContextVar[FiniteScans | None] = ContextVar("moekit_finite_scans", default=None)


@contextlib.contextmanager
def background_scans() -> Iterator[FiniteScans]:
    """While open, verbatim ranges are scanned on a second thread; call ``finish()`` on it before publishing."""
    scans = FiniteScans()
    token = _SCANS.set(scans)
    try:
        yield scans
    finally:
        _SCANS.reset(token)
        scans.close()


def verbatim_range(checkpoint: Checkpoint, name: str, dtype: Any, rows: tuple[int, int] | None = None) -> Range | None:
    """The byte range of ``name`` (or of its ``rows`` (start, count)) when it goes out as stored (same dtype),
    NaN/inf-checked.

    Inside :func:`background_scans` the check is queued on the scan thread; otherwise it runs here.
    """
    info = checkpoint.tensors[name]
    if rows is not None:
        info = row_slice(info, *rows)
    if info.dtype != dtype_code(dtype):
        return None
    path = checkpoint.path / info.shard
    scans = _SCANS.get()
    if scans is not None:
        scans.submit(path, info, name, checkpoint)
    elif not finite_on_disk(path, info):
        raise _non_finite(name, checkpoint)
    return path, info.offset, info.nbytes


def expert_range(
    inputs: MixInputs,
    cfg: MixConfig,
    plan: BlockPlan,
    layer: int,
    expert: int,
    projection: str,
    dtype: Any,
) -> Range | None:
    """Where routed expert ``expert``'s ``projection`` of ``layer`` can be copied from unchanged, or None if it is
    computed.

    Under ``--split`` a chunk's gate/up rows are contiguous on disk (copied); its down columns are not.
    """
    if cfg.upcycle is not None and cfg.upcycle.drop_fraction > 0:
        return None
    if projection == "down_proj" and (plan.down_scale != 1.0 or plan.split > 1):
        return None
    source, chunk = plan.source_of(expert)
    rows = (chunk * plan.expert_size, plan.expert_size) if plan.split > 1 else None
    return verbatim_range(
        inputs.experts[source].checkpoint, inputs.adapter.dense_ffn_name(layer, projection), dtype, rows
    )


def write_experts(
    tensor: MoeTensor,
    inputs: MixInputs,
    cfg: MixConfig,
    plan: BlockPlan,
    layer: int,
    writer: StreamingShardWriter,
    dtype: Any,
    computed: Callable[[int], dict[str, Any]],
) -> None:
    """Write an ``expert``, ``fused_gate_up`` or ``fused_down`` tensor: copied where every part is verbatim, else
    computed."""
    experts = range(plan.experts)
    if tensor.role == "expert":
        assert tensor.expert is not None and tensor.projection is not None
        parts = [expert_range(inputs, cfg, plan, layer, tensor.expert, tensor.projection, dtype)]
    elif tensor.role == "fused_gate_up":  # each expert's gate rows, then its up rows
        parts = [expert_range(inputs, cfg, plan, layer, e, p, dtype) for e in experts for p in ("gate_proj", "up_proj")]
    else:  # fused_down: each expert's down projection in turn
        parts = [expert_range(inputs, cfg, plan, layer, e, "down_proj", dtype) for e in experts]
    if all(part is not None for part in parts):
        writer.copy_ranges(tensor.name, dtype, tensor.shape, [p for p in parts if p is not None])
        return
    import torch

    from moekit.io.checkpoint import SAFETENSORS_DTYPES

    dtype = SAFETENSORS_DTYPES[dtype_code(dtype)]
    if tensor.role == "expert":
        assert tensor.expert is not None and tensor.projection is not None
        writer.write(tensor.name, computed(tensor.expert)[tensor.projection].to(dtype))
    elif tensor.role == "fused_gate_up":
        chunks = (torch.cat([computed(e)["gate_proj"], computed(e)["up_proj"]]).to(dtype).unsqueeze(0) for e in experts)
        writer.write_chunks(tensor.name, dtype, tensor.shape, chunks)
    else:
        writer.write_chunks(
            tensor.name, dtype, tensor.shape, (computed(e)["down_proj"].to(dtype).unsqueeze(0) for e in experts)
        )


def write_shared(
    tensor: MoeTensor, inputs: MixInputs, layer: int, writer: StreamingShardWriter, dtype: Any, down_scale: float
) -> None:
    """The shared expert: the seed's FFN (copied where verbatim), its down projection times ``down_scale``.

    ``down_scale`` 0 writes down = 0, so the shared expert adds exactly nothing until trained;
    with ``--seed-as shared`` it is the factor that keeps the identical-branches invariant.
    """
    assert tensor.projection is not None
    code = dtype_code(dtype)
    name = inputs.adapter.dense_ffn_name(layer, tensor.projection)
    scale = down_scale if tensor.projection == "down_proj" else 1.0
    if scale == 0.0:
        writer.write_array(tensor.name, code, np.zeros(tensor.shape, dtype=stored_dtype(code)))
        return
    part = scaled_part(inputs.seed, name, code, scale, "That model is damaged: restore it, or use another seed.")
    writer.write_parts(tensor.name, code, tensor.shape, [part])


def scaled_part(checkpoint: Checkpoint, name: str, code: str, scale: float, fix: str) -> Any:
    """Tensor ``name`` of ``checkpoint`` in dtype ``code`` times ``scale``: its byte range where it goes out as
    stored (scale 1, same dtype; NaN/inf-checked as :func:`verbatim_range` does), else a checked, scaled array."""
    from moekit.io.floats import finite, from_float32, to_float32

    part = verbatim_range(checkpoint, name, code) if scale == 1.0 else None
    if part is not None:
        return part
    source = checkpoint.tensors[name]
    raw = checkpoint.array_rows(name, 0, source.shape[0])
    if not finite(raw, source.dtype):
        raise NonFiniteError(
            f"Tensor {name} of {checkpoint.path} holds NaN or infinite values; a model mixed from it would be broken.",
            fix,
        )
    values = to_float32(raw, source.dtype)
    if scale != 1.0:
        values = values * np.float32(scale)  # halving is exact in every float format
    return from_float32(values, code)
