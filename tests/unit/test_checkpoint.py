"""Broken model directories give clear errors, found from headers alone."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moekit.errors import CorruptCheckpointError, InputNotFoundError
from moekit.io.checkpoint import Checkpoint


@pytest.fixture()
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.ones(4, 4)}, tmp_path / "model.safetensors")
    return tmp_path


def test_reads_tensor(model_dir):
    assert torch.equal(Checkpoint(model_dir).get("w"), torch.ones(4, 4))


def test_truncated_file(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        Checkpoint(model_dir)


def test_garbage_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="unreadable"):
        Checkpoint(model_dir)


def test_missing_shard(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputNotFoundError, match="missing"):
        Checkpoint(model_dir)


def test_pickle_only(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputNotFoundError, match="pickle"):
        Checkpoint(model_dir)


def test_no_config(tmp_path):
    with pytest.raises(InputNotFoundError, match="config.json"):
        Checkpoint(tmp_path)
