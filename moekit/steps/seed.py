"""Building a small pretrained seed locally (for the demo and offline experiments).

A byte-level BPE tokenizer is trained with the ``tokenizers`` library on a sample of the
pretraining data, a small Llama-family model is initialised and pretrained with moekit's own
training loop on an equal mixture of the given domains. The result is an ordinary HF directory.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.domains import domains_data, heldout_sets, training_mixture
from moekit.data.sources import iter_spec_documents
from moekit.tiny import train_bpe

SIZES: dict[str, dict[str, Any]] = {
    # about 4.2M parameters with a 4096-token vocabulary and tied embeddings
    "small": dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}
_TOKENIZER_SAMPLE_CHARS = 2_000_000


def train_tokenizer(specs: dict[str, list[str]], vocab_size: int, out_dir: Path) -> Any:
    """A byte-level BPE trained on an equal sample of every domain; saved as a HF fast tokenizer."""
    per_domain = _TOKENIZER_SAMPLE_CHARS // max(1, len(specs))

    def sample() -> Any:
        for domain_specs in specs.values():
            budget = per_domain
            for doc in itertools.chain.from_iterable(iter_spec_documents(s) for s in domain_specs):
                yield doc[:budget]
                budget -= len(doc)
                if budget <= 0:
                    break

    return train_bpe(sample(), vocab_size, out_dir)


def build_pretrained_seed(
    out: Path,
    specs: dict[str, list[str]],
    settings: LoopSettings,
    size: str = "small",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    show_progress: bool = True,
) -> Path:
    """Train a tokenizer and pretrain a small Llama on an equal mix of ``specs``; write it to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.train.loop import LoopJob, make_loop_engine, run_loop
    from moekit.train.saving import write_trained_model

    work = out.parent / f"{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(specs, vocab_size, work / "tokenizer")
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        max_position_embeddings=max(1024, settings.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The domains' held-out tails (the same token ranges the run records later) are never pretrained on.
    domains = domains_data(tokenizer, specs, {}, settings.seq_len, val_fraction, "text", work / "tokens")
    pool = training_mixture(domains, None, settings.seed)
    eval_sets = heldout_sets(domains, settings.eval_blocks)
    engine = make_loop_engine(settings)
    try:
        result = run_loop(
            LoopJob(
                model,
                pool,
                eval_sets,
                settings,
                work,
                resume=True,
                description="pretrain seed",
                show_progress=show_progress,
            ),
            engine,
        )
    finally:
        engine.close()
    assert result.state_dict is not None
    write_trained_model(
        out, work / "tokenizer", model, result.state_dict, torch.float32, [work / "metrics.jsonl"], force=True
    )
    return out
