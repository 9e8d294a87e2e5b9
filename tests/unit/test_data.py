"""Reading, tokenising and packing text data."""

import json

import pytest

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
    stream = (
        [ord(c) for c in "abcdefgh"]
        + [0]
        + [ord(c) for c in "ijkl"]
        + [0]
        + [ord(c) for c in "mn"]
        + [0]
        + [ord(c) for c in "op"]
        + [0]
    )
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

    from moekit.data import cached_store, token_stream

    pq.write_table(pa.table({"content": ["abc", "de"]}), tmp_path / "a.parquet")
    stream = token_stream(CharTokenizer(), tmp_path / "a.parquet", text_field="content")
    assert stream.tolist() == [97, 98, 99, 0, 100, 101, 0]
    store = cached_store(CharTokenizer(), tmp_path / "a.parquet", "content", tmp_path / "cache")
    assert store.read(0, store.num_tokens).tolist() == stream.tolist()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = cached_store(CharTokenizer(), tmp_path / "a.parquet", "content", tmp_path / "cache")
    assert again.path == store.path and len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(DataError, match="no column 'text'"):
        token_stream(CharTokenizer(), tmp_path / "a.parquet")


def test_hub_dataset_unreachable_is_a_clear_error(monkeypatch):
    from moekit.data import token_stream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="Cannot load dataset hf:moekit-test/none"):
        token_stream(CharTokenizer(), "hf:moekit-test/none@train")


def test_heldout_split_is_a_token_position_at_a_document_end_when_one_is_near(tmp_path):
    from moekit.data import TokenSequence, cached_store, heldout_start

    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": "x" * 9}) + "\n" for _ in range(20))
    )  # 20 docs of 10 tokens
    sequence = TokenSequence([cached_store(CharTokenizer(), tmp_path / "d.jsonl", "text", tmp_path / "cache")])
    assert sequence.num_tokens == 200
    assert heldout_start(sequence, 0.1) == 180  # exactly a document end
    assert heldout_start(sequence, 0.12) == 170  # 24 held out: 176 moves back to the document end 6 tokens before it
    assert heldout_start(sequence, 0.02) == 196  # 4 held out: the document end at 190 is too far; cut at the token
    assert heldout_start(sequence, 0.0) == 200
    (tmp_path / "one.txt").write_text("y" * 199)  # one long document: cut at the exact position
    single = TokenSequence([cached_store(CharTokenizer(), tmp_path / "one.txt", "text", tmp_path / "cache")])
    assert heldout_start(single, 0.1) == 180
