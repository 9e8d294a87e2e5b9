"""The streaming shard writer produces standard safetensors that other readers accept."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moekit.io.checkpoint import Checkpoint
from moekit.io.writer import PlannedTensor, StreamingShardWriter, parse_size


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d": torch.randn(2, 2, generator=gen).to(torch.float16),
    }


def _write(tmp_path, tensors, max_bytes):
    plan = [PlannedTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = StreamingShardWriter(tmp_path, plan, max_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    return writer


def test_single_shard_roundtrip(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors, 1 << 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_multi_shard_index_and_reader(tmp_path):
    tensors = _tensors()
    (tmp_path / "config.json").write_text("{}")
    writer = _write(tmp_path, tensors, 40)
    assert len(writer.shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    checkpoint = Checkpoint(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(checkpoint.get(name), tensor)
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)


def test_out_of_plan_tensor_is_rejected(tmp_path):
    writer = StreamingShardWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], 1 << 20)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="before all tensors"):
        writer.close()


@pytest.mark.parametrize(
    ("text", "expected"), [("2GB", 2 << 30), ("500MB", 500 << 20), ("1.5GiB", int(1.5 * (1 << 30))), ("4096", 4096)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(ValueError):
        parse_size("lots")
