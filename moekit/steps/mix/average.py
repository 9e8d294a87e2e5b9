"""Uniform weight average of dense branches (Branch-Train-Merge's merge): a baseline for BTX.

Every tensor, FFNs included, is the fp32 mean over the branches, cast to the branches' dtype.
Streams like ``mix``: planned shards, row-chunked averaging, an atomic output directory.
"""

from __future__ import annotations

from pathlib import Path

from moekit.io.checkpoint import Checkpoint
from moekit.io.config_json import portable_config, write_config_json
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.floats import from_float32
from moekit.io.outputs import atomic_output_dir, guard_output
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size
from moekit.models import open_dense_model
from moekit.steps.mix.inputs import check_compatible, redundant_tied_copies
from moekit.steps.mix.tensors import average_rows


def average_models(models: list[Path], out: Path, force: bool = False, shard_size: str = "2GB") -> Path:
    """Write the uniform average of ``models`` (same architecture) to ``out``; return ``out``."""
    validated = [open_dense_model(Path(m))[0] for m in models]
    check_compatible(validated[0], [(str(c.path), c) for c in validated[1:]])
    checkpoints = [Checkpoint(Path(m)) for m in models]  # stored layout (no adapter views): the output is dense too
    reference = checkpoints[0]
    code = reference.dtype_code()
    skipped = redundant_tied_copies(reference.config, reference.tensors)  # a tied output stores no LM head
    plan = [
        PlannedTensor(name, code, info.shape) for name, info in sorted(reference.tensors.items()) if name not in skipped
    ]
    sources = [(c, 1.0 / len(checkpoints)) for c in checkpoints]
    guard_output(out, "model", force, models)
    with atomic_output_dir(out, "model", force=force) as tmp:
        writer = StreamingShardWriter(tmp, plan, parse_size(shard_size))
        try:
            for tensor in plan:
                writer.write_chunks(
                    tensor.name,
                    code,
                    tensor.shape,
                    (from_float32(chunk, code) for chunk in average_rows(sources, tensor.name)),
                )
            writer.close()
        except BaseException:
            writer.abort()  # the shard files are closed; the atomic output dir removes them
            raise
        finally:
            for checkpoint in checkpoints:
                checkpoint.close()
        # the dtype written, whatever the reference's config says
        write_config_json(tmp, portable_config(reference.config, code))
        copy_tokenizer_and_generation_files(reference.path, tmp)
    return out
