"""Experts copied file to file are bit-identical to their sources, in every target layout and dtype."""

from __future__ import annotations

import pytest
import torch

from moekit.arch import get_adapter
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.io.writer import StreamingShardWriter
from moekit.models import open_dense_model
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import perturb_model
from tests.conftest import FAMILIES

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _expert_bytes(moe: Checkpoint, adapter, layer: int, expert: int, projection: str, intermediate: int) -> bytes:
    """One expert projection's bytes as the output stores them (per expert, or a slice of a stacked tensor)."""
    block = f"model.layers.{layer}.{adapter.moe_block}"
    if adapter.fused_experts is None:
        return moe.get(adapter.expert_name(layer, expert, projection)).view(torch.uint8).numpy().tobytes()
    gate_up, down = (f"{block}.{n}" for n in adapter.fused_experts)
    if projection == "down_proj":
        return moe.get(down)[expert].contiguous().view(torch.uint8).numpy().tobytes()
    rows = moe.get(gate_up)[expert]
    part = rows[:intermediate] if projection == "gate_proj" else rows[intermediate:]
    return part.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", FAMILIES)
def test_copied_experts_are_the_branches_bytes(family, dtype, make_seed, tmp_path, monkeypatch):
    copies = []
    real = StreamingShardWriter.copy_ranges
    monkeypatch.setattr(
        StreamingShardWriter, "copy_ranges", lambda self, name, *a: (copies.append(name), real(self, name, *a))[1]
    )
    seed = make_seed(family, dtype=dtype)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()))).out
    adapter, moe = get_adapter(family), Checkpoint(out)
    sources = [open_dense_model(p)[0] for p in run.branches.values()] + [open_dense_model(seed)[0]]
    layers = moe.config["num_hidden_layers"]
    intermediate = sources[0].tensors[adapter.dense_ffn_name(0, "gate_proj")].shape[0]
    assert copies  # the file-to-file path ran
    for layer in range(layers):
        for expert, source in enumerate(sources):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                expected = source.get(adapter.dense_ffn_name(layer, projection)).view(torch.uint8).numpy().tobytes()
                assert _expert_bytes(moe, adapter, layer, expert, projection, intermediate) == expected, (
                    layer,
                    expert,
                    projection,
                )


def test_a_dtype_change_computes_the_experts(make_seed, tmp_path):
    """bf16 branches mixed into float32: the experts are cast, not copied, and equal the cast values."""
    seed = make_seed("llama", dtype=torch.bfloat16)
    run = branch(str(seed), tmp_path / "run", ["code"])
    perturb_model(run.branches["code"], seed=3, scale=0.05)
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), dtype="float32")).out
    moe, source = Checkpoint(out), Checkpoint(run.branches["code"])
    got = moe.get(get_adapter("llama").expert_name(1, 0, "up_proj"))
    assert got.dtype == torch.float32 and torch.equal(got, source.get("model.layers.1.mlp.up_proj.weight").float())


def test_mix_imports_neither_torch_nor_transformers(make_seed, tmp_path):
    """Most of a mix's start-up was importing them; the random-router path needs neither (centroid calibration does)."""
    import subprocess
    import sys

    seed = make_seed("llama", dtype=torch.bfloat16)
    run = branch(str(seed), tmp_path / "run", ["code"])
    script = (
        "import sys\nfrom typer.testing import CliRunner\nfrom moekit.cli import build_app\n"
        f"result = CliRunner().invoke(build_app(), ['mix', {str(run.run_dir)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
