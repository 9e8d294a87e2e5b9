"""One held-out split per domain, recorded: no command evaluates on tokens another one trained on."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import EvalConfig
from moekit.data.domains import domains_data, token_sequence
from moekit.manifest import load_manifest
from moekit.steps.evaluate import _run_dir_heldout
from moekit.tiny import domain_corpus


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.mark.parametrize("train_len,val_fraction,eval_len", [(32, "0.01", 64), (64, "0.2", 16), (16, "0.05", 512)])
def test_eval_of_a_run_never_scores_training_tokens(train_len, val_fraction, eval_len, make_seed, tmp_path):
    seed = make_seed("llama")
    (tmp_path / "code.txt").write_text(domain_corpus("code", 600))
    assert cli("branch", seed, tmp_path / "run", "--domain", "code").exit_code == 0
    result = cli(
        "train",
        tmp_path / "run",
        "--data",
        f"code={tmp_path / 'code.txt'}",
        "--max-steps",
        "1",
        "--seq-len",
        train_len,
        "--batch-size",
        "2",
        "--val-fraction",
        val_fraction,
        "--eval-every",
        "0",
        "--eval-blocks",
        "1",
    )
    assert result.exit_code == 0, result.output
    record = load_manifest(tmp_path / "run").branches["code"].heldout
    assert record is not None and record.val_fraction == float(val_fraction)
    # the training side: the view train reads ends before the split, whatever the block length
    tokenizer = AutoTokenizer.from_pretrained(seed)
    manifest = load_manifest(tmp_path / "run")
    specs = {"code": manifest.branches["code"].data}
    cache = tmp_path / "run" / ".cache" / "tokens"
    domain = domains_data(tokenizer, specs, {}, train_len, None, "text", cache, manifest)["code"]
    assert domain.heldout.start == record.start and len(domain.train) > 0
    assert domain.train.start + len(domain.train) * train_len <= record.start

    held = _run_dir_heldout(EvalConfig(models=[str(tmp_path / "run")], seq_len=eval_len, max_tokens=10**9), tokenizer)[
        "code"
    ]
    sequence = token_sequence(tokenizer, [str(tmp_path / "code.txt")], "text", tmp_path / "run" / ".cache" / "tokens")
    # the evaluated tokens are exactly the recorded tail: none of them is before the split
    assert np.array_equal(held.flatten().numpy(), sequence.read(record.start, record.start + held.numel()))
    assert record.start + held.numel() <= sequence.num_tokens

    # a later command asking for another split of the same data is refused, not silently re-split
    assert cli("mix", tmp_path / "run").exit_code == 0
    tune = cli("tune", tmp_path / "run", "--max-steps", "1", "--seq-len", "16", "--val-fraction", "0.3")
    assert tune.exit_code == 2 and "recorded with val_fraction" in tune.output
