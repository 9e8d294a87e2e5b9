"""The checkpoints users have: every family through branch -> train -> mix -> tune on a format matrix.

Seeds differ in dtype (fp32, bf16, fp16), tied or untied embeddings, transformers-4 or -5
tokenizer configs, and one or several safetensors shards. ``PAIRWISE`` is a pairwise design: its
six settings contain every pair of values of those four dimensions. ``COMMON`` is the most common
real seed (bf16, tied, transformers-5 tokenizer: SmolLM2, Llama-3.2-1B, Qwen2.5/Qwen3 small
models). The fast suite runs every family on COMMON and on one PAIRWISE setting (together all
six); ``-m slow`` runs every family on all seven settings.

Each output must store the seed's dtype and say so in config.json, keep a tie tied (no
``lm_head.weight``), carry a tokenizer every reader loads, and load with empty loading info. Mixing
the untrained branches must reproduce the seed's logits (loaded in fp32: the averages and expert
copies are exact in any storage dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moekit.config import LoopSettings, MixConfig, TrainConfig, TuneConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.steps.train import train
from moekit.steps.tune import tune
from moekit.tiny import domain_corpus
from tests.conftest import FAMILIES
from tests.formats import assert_portable_checkpoint

# dtype, tied, tokenizer style, sharded
COMMON = (torch.bfloat16, True, "v5", False)
PAIRWISE = [
    (torch.float32, True, "v5", True),
    (torch.float32, False, "v4", False),
    (torch.bfloat16, True, "v4", False),
    (torch.bfloat16, False, "v5", True),
    (torch.float16, True, "v4", True),
    (torch.float16, False, "v5", False),
]
FAST = [(family, *COMMON) for family in FAMILIES] + [
    (family, *PAIRWISE[i % len(PAIRWISE)]) for i, family in enumerate(FAMILIES)
]
FULL = [(family, *setting) for family in FAMILIES for setting in [COMMON, *PAIRWISE] if (family, *setting) not in FAST]
LOOP = dict(seq_len=32, batch_size=2, max_steps=2, lr=3e-3, eval_every=0, eval_blocks=2, save_every=0)


def _row_id(row: tuple) -> str:
    family, dtype, tied, style, sharded = row
    parts = [
        family,
        str(dtype).removeprefix("torch."),
        "tied" if tied else "untied",
        f"tok{style}",
        "shards" if sharded else "single",
    ]
    return "-".join(parts)


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("row", FAST + [pytest.param(row, marks=pytest.mark.slow) for row in FULL], ids=_row_id)
def test_pipeline_on_the_format_matrix(row, make_seed, tmp_path):
    family, dtype, tied, style, sharded = row
    options = dict(dtype=dtype, tie_word_embeddings=tied, tokenizer_style=style)
    if sharded:
        options["max_shard_size"] = "16KB"
    seed = make_seed(family, **options)
    assert (seed / "model.safetensors.index.json").is_file() == sharded
    run = branch(str(seed), tmp_path / "run", ["code", "math"]).run_dir
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 120))

    untrained = mix(
        MixConfig(
            out=tmp_path / "untrained", seed=str(seed), experts=[(n, run / "branches" / n) for n in ("code", "math")]
        )
    )
    assert_portable_checkpoint(untrained.out, dtype, tied, seed)
    torch.testing.assert_close(_logits(untrained.out), _logits(seed), atol=1e-5, rtol=0)

    data = {d: [str(tmp_path / f"{d}.txt")] for d in ("code", "math")}
    train(TrainConfig(run_dir=run, data=data, loop=LoopSettings(**LOOP)), show_progress=False)
    seed_names = set(Checkpoint(seed).tensors)
    for name in ("code", "math"):
        assert (
            set(Checkpoint(run / "branches" / name).tensors) == seed_names
        )  # nothing added (no untied lm_head), nothing lost
        assert_portable_checkpoint(run / "branches" / name, dtype, tied, seed)

    mixed = mix(
        MixConfig(
            out=run / "mixed",
            seed=str(seed),
            run_dir=run,
            experts=[(n, run / "branches" / n) for n in ("code", "math")],
        )
    )
    assert_portable_checkpoint(mixed.out, dtype, tied, seed)
    seed_config = json.loads((seed / "config.json").read_text())
    assert json.loads((mixed.out / "config.json").read_text())["intermediate_size"] == seed_config["intermediate_size"]

    tuned = tune(
        TuneConfig(model=mixed.out, out=run / "tuned", run_dir=run, data=data, loop=LoopSettings(**LOOP)),
        show_progress=False,
    )
    assert_portable_checkpoint(tuned.out, dtype, tied, seed)
    assert set(Checkpoint(tuned.out).tensors) == set(Checkpoint(mixed.out).tensors)
