"""The token store: equal to direct tokenisation, compact dtypes, invalidation, atomic preparation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from moekit.data import cached_store, prepare_store, token_stream
from moekit.data.blocks import BlockView, MixtureBlocks, TokenSequence
from moekit.data.store import TokenStore, store_key
from moekit.errors import DataError
from moekit.tiny import build_tokenizer, domain_corpus


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def corpus(tmp_path) -> dict[str, Path]:
    files = {"txt": tmp_path / "code.txt", "jsonl": tmp_path / "prose.jsonl"}
    files["txt"].write_text(domain_corpus("code", 400))
    files["jsonl"].write_text(
        "".join(json.dumps({"text": domain_corpus("prose", 3, seed=i)}) + "\n" for i in range(300))
    )
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "a b"}) + "\n")
    files["blank"] = tmp_path / "blank.jsonl"
    return files


@pytest.mark.parametrize("workers", [1, 2])
def test_store_equals_direct_tokenisation(workers, tokenizer, corpus, tmp_path):
    """Same ids and EOS separators as tokenising in memory, across several shards, for any number of workers."""
    for kind, path in corpus.items():
        store = prepare_store(
            tokenizer, [path], tmp_path / f"store-{kind}-{workers}", workers=workers, shard_tokens=1000
        )
        direct = token_stream(tokenizer, path).long().numpy()
        assert store.num_tokens == len(direct)
        assert np.array_equal(store.read(0, store.num_tokens), direct)
        if len(direct) > 2005:
            assert np.array_equal(store.read(995, 2005), direct[995:2005])  # across shard boundaries
        eos = tokenizer.eos_token_id
        ends = [store.document_end(i) for i in range(store.num_documents)]
        assert ends == [i + 1 for i, token in enumerate(direct) if token == eos]  # each document ends just past its EOS
        assert store.meta["dtype"] == "uint16" and len(store.meta["shards"]) == -(-len(direct) // 1000)


def test_large_vocabularies_use_uint32(corpus, tmp_path):
    class BigVocabulary:
        """Maps each character to an id above 65,535."""

        eos_token_id = 70_000

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[66_000 + ord(c) % 1000 for c in text] for text in texts]}

        def get_vocab(self):
            return {"eos": 70_000}

    store = prepare_store(BigVocabulary(), [corpus["txt"]], tmp_path / "big", workers=1)
    assert store.meta["dtype"] == "uint32"
    assert store.read(0, 3).tolist() == [66_000 + ord(c) % 1000 for c in corpus["txt"].read_text()[:3]]


def test_changed_tokenizer_or_file_gets_a_new_store(tokenizer, corpus, tmp_path):
    cache = tmp_path / "cache"
    first = cached_store(tokenizer, corpus["txt"], "text", cache)
    assert cached_store(tokenizer, corpus["txt"], "text", cache).path == first.path  # reused
    other = build_tokenizer(tmp_path / "other-tok", vocab_size=300)
    assert cached_store(other, corpus["txt"], "text", cache).path != first.path
    time.sleep(0.01)
    corpus["txt"].write_text(corpus["txt"].read_text() + "def extra():\n    pass\n")
    changed = cached_store(tokenizer, corpus["txt"], "text", cache)
    assert changed.path != first.path and changed.num_tokens > first.num_tokens


def test_prepared_store_is_data_and_refuses_another_tokenizer(tokenizer, corpus, tmp_path):
    store = prepare_store(tokenizer, [corpus["txt"], corpus["jsonl"]], tmp_path / "prepared", workers=1)
    assert cached_store(tokenizer, str(store.path), "text", tmp_path / "cache").path == store.path  # used as it is
    assert token_stream(tokenizer, store.path, max_tokens=10).tolist() == store.read(0, 10).tolist()
    with pytest.raises(DataError, match="another tokenizer"):
        cached_store(build_tokenizer(tmp_path / "other", vocab_size=300), str(store.path), "text", tmp_path / "cache")


def test_block_views_and_mixtures_read_only_what_they_return(tokenizer, corpus, tmp_path):
    sequence = TokenSequence(
        [prepare_store(tokenizer, [p], tmp_path / k, workers=1, shard_tokens=500) for k, p in corpus.items()]
    )
    tokens = np.concatenate([s.read(0, s.num_tokens) for s in sequence.stores])
    view = BlockView(sequence, 100, sequence.num_tokens - 50, 32)
    assert len(view) == (sequence.num_tokens - 150) // 32
    picked = view.get(torch.tensor([0, 5, len(view) - 1]))
    for row, index in zip(picked, [0, 5, len(view) - 1]):
        assert row.tolist() == tokens[100 + index * 32 : 100 + (index + 1) * 32].tolist()
    half = BlockView(sequence, 0, 3200, 32)
    mixture = MixtureBlocks({"a": view, "b": half}, {"a": 3.0, "b": 1.0}, seed=1)
    assert len(mixture) == len(view) + len(half)
    assert int((mixture.domain_of == 0).sum()) == round(len(mixture) * 0.75)
    position = int((mixture.domain_of == 1).nonzero()[0])
    assert torch.equal(mixture.get(torch.tensor([position]))[0], half.get(mixture.block_of[[position]])[0])
    assert mixture.fingerprint() == MixtureBlocks({"a": view, "b": half}, {"a": 3.0, "b": 1.0}, seed=1).fingerprint()


def test_killed_prepare_leaves_no_half_store_and_a_rerun_finishes(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(domain_corpus("code", 40_000))  # ~2 MB: enough to kill prepare before it finishes
    seed = tmp_path / "tok"
    build_tokenizer(seed)
    out = tmp_path / "store"
    command = [
        sys.executable,
        "-m",
        "moekit",
        "prepare",
        str(big),
        "--tokenizer",
        str(seed),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while (
        not any(".tmp-" in p.name for p in tmp_path.iterdir())
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.killpg(os.getpgid(process.pid), 0)  # (exists)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not out.exists()  # never a half store under the final name
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert TokenStore(out).num_tokens == len(token_stream(AutoTokenizer.from_pretrained(seed), big))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the killed run's temporary directory is gone


def test_store_key_depends_on_every_spec(tokenizer, corpus):
    assert store_key(tokenizer, [corpus["txt"]], "text") != store_key(
        tokenizer, [corpus["txt"], corpus["jsonl"]], "text"
    )


def test_a_large_txt_document_is_read_in_pieces_with_the_same_ids(tokenizer, corpus, tmp_path, monkeypatch):
    """Pieces end at line ends, where byte-level BPE starts a new pre-token: the ids equal the whole file's."""
    import moekit.data.sources as sources

    whole = tokenizer(corpus["txt"].read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    monkeypatch.setattr(sources, "_TXT_PIECE_CHARS", 1000)
    pieces = list(sources.iter_pieces(corpus["txt"]))
    assert len(pieces) > 5 and [ends for _, ends in pieces].count(True) == 1
    store = prepare_store(tokenizer, [corpus["txt"]], tmp_path / "pieces", workers=2)
    assert store.read(0, store.num_tokens).tolist() == whole and store.num_documents == 1


_BORN_BLOCKED: dict = {}


def _record_then_init(tokenizer_json: str, eos: int | None) -> None:
    import signal

    from moekit.data.encode import init_worker

    _BORN_BLOCKED["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask the worker was forked with
    init_worker(tokenizer_json, eos)


def _worker_signal_state() -> tuple[set, set, object]:
    import signal

    return _BORN_BLOCKED["mask"], signal.pthread_sigmask(signal.SIG_BLOCK, []), signal.getsignal(signal.SIGTERM)


def test_tokeniser_workers_are_forked_with_sigterm_blocked(tmp_path):
    """A SIGTERM reaching a forked worker before its initialiser must wait, not run the parent's handler (which
    raises: the child would escape into the parent's program). After the initialiser it kills the worker."""
    import multiprocessing
    import signal

    from moekit.data.encode import worker_signals_blocked
    from moekit.tiny import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with worker_signals_blocked():
        pool = multiprocessing.get_context("fork").Pool(
            1, initializer=_record_then_init, initargs=(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)
        )
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the parent's mask is restored
    with pool:
        born, after_init, handler = pool.apply(_worker_signal_state)
    assert {signal.SIGTERM, signal.SIGINT} <= born
    assert signal.SIGTERM not in after_init and handler == signal.SIG_DFL
