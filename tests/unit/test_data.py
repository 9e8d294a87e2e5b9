"""Reading, tokenising and packing text data."""

import json

import pytest
import torch

from moekit.data import expand_data_paths, load_token_blocks
from moekit.errors import DataError


class CharTokenizer:
    """A stand-in tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) for c in texts]}
        return {"input_ids": [[ord(c) for c in text] for text in texts]}

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


def test_formats_and_packing_without_padding(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ijkl"}) + "\n" + json.dumps({"text": "mn"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(["op"]))
    blocks = load_token_blocks(CharTokenizer(), tmp_path, block_size=4)
    stream = [ord(c) for c in "abcdefgh"] + [0] + [ord(c) for c in "ijkl"] + [0] + [ord(c) for c in "mn"] + [0] + [ord(c) for c in "op"] + [0]
    assert blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


def test_max_tokens(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    assert load_token_blocks(CharTokenizer(), tmp_path / "a.txt", 8, max_tokens=20).numel() == 16


def test_missing_path():
    with pytest.raises(DataError, match="does not exist"):
        expand_data_paths("/nonexistent/data.txt")


def test_empty_data(tmp_path):
    (tmp_path / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no text"):
        load_token_blocks(CharTokenizer(), tmp_path / "a.txt", 8)


def test_missing_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="text"):
        load_token_blocks(CharTokenizer(), tmp_path / "a.jsonl", 8)


def test_parquet_and_caching(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moekit.data import token_stream

    pq.write_table(pa.table({"content": ["abc", "de"]}), tmp_path / "a.parquet")
    stream = token_stream(CharTokenizer(), tmp_path / "a.parquet", text_field="content", cache_dir=tmp_path / "cache")
    assert stream.tolist() == [97, 98, 99, 0, 100, 101, 0]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    again = token_stream(CharTokenizer(), tmp_path / "a.parquet", text_field="content", cache_dir=tmp_path / "cache")
    assert torch.equal(stream, again)
    with pytest.raises(DataError, match="no column 'text'"):
        token_stream(CharTokenizer(), tmp_path / "a.parquet")


def test_hub_dataset_unreachable_is_a_clear_error(monkeypatch):
    from moekit.data import token_stream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="Cannot load dataset hf:moekit-test/none"):
        token_stream(CharTokenizer(), "hf:moekit-test/none@train")


def test_validation_split():
    from moekit.data import split_validation

    blocks = torch.arange(40).view(20, 2)
    train, val = split_validation(blocks, 0.1, "x")
    assert len(train) == 18 and torch.equal(val, blocks[-2:])
    with pytest.raises(DataError, match="too few"):
        split_validation(blocks[:1], 0.1, "x")
