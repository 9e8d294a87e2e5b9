"""Tiny models and tokenizers built locally, for the demo, the tests and the benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in well under a
second on text generated here, and models are random-initialised from a config built through
``AutoConfig.for_model`` for any dense family moekit supports.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

_WORDS = (
    "def return class import self for while if else print value list dict range len sum "
    "the of and to in is that it was for on are as with his they at be this from have "
    "plus minus times equals answer number total each solve find"
).split()


def sample_corpus(num_lines: int = 400, seed: int = 0) -> str:
    """A small deterministic text mixing the code-like, prose-like and arithmetic domains."""
    return "".join(domain_corpus(d, num_lines // 3, seed) for d in ("code", "prose", "math"))


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Any:
    """A byte-level BPE trained on ``texts`` (with <s>, </s> and <pad>), saved to ``out_dir`` as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out_dir)
    return fast


def build_tokenizer(out_dir: Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on ``sample_corpus`` and save it as a HF fast tokenizer."""
    return train_bpe(sample_corpus().splitlines(), vocab_size, out_dir)


def tiny_config(model_type: str, vocab_size: int = 512, **overrides: Any) -> Any:
    """A small config of ``model_type`` (2 layers, hidden 32, 4 heads, 2 KV heads, FFN 64)."""
    from transformers import AutoConfig

    values: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def write_v4_tokenizer_config(model_dir: Path) -> None:
    """Rewrite ``model_dir``'s tokenizer files as transformers 4.x saved them.

    transformers 4.x wrote ``"tokenizer_class": "PreTrainedTokenizerFast"``, an
    ``added_tokens_decoder`` table and a special_tokens_map.json; transformers 5 writes
    ``"TokenizersBackend"`` and no map. Real seeds come in both styles.
    """
    import json

    path = Path(model_dir) / "tokenizer_config.json"
    v5 = json.loads(path.read_text())
    special = {k: v5[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in v5}
    vocab = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    decoder = {
        str(t["id"]): {
            "content": t["content"],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in vocab.get("added_tokens", [])
    }
    v4 = {
        "added_tokens_decoder": decoder,
        **special,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    path.write_text(json.dumps(v4, indent=2) + "\n")
    (Path(model_dir) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_tiny_model(
    out_dir: Path,
    model_type: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.2,
    tokenizer_style: str = "v5",
    max_shard_size: str | None = None,
    tokenizer_dir: Path | None = None,
    **overrides: Any,
) -> Path:
    """Save a random tiny dense model of ``model_type`` with a tokenizer in ``out_dir``; return it.

    ``init_std`` is larger than usual (0.2, not 0.02) so that FFNs and attention matter for the
    logits; with 0.02 a random tiny model is nearly an identity map and tests would prove little.
    ``tokenizer_style`` "v4" writes the tokenizer config as transformers 4.x did;
    ``max_shard_size`` (e.g. "40KB") saves several safetensors shards with an index;
    ``tokenizer_dir`` takes a real model's tokenizer files instead of training a small BPE.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.io.files import TOKENIZER_FILES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                (out_dir / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
    else:
        tokenizer = build_tokenizer(out_dir)
    if tokenizer_style == "v4":
        write_v4_tokenizer_config(out_dir)
    overrides.setdefault("vocab_size", len(tokenizer))
    config = tiny_config(model_type, initializer_range=init_std, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms default to ones; vary them so mistakes in averaging show up
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(dtype).save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out_dir


# Expert settings of third-party MoE families as transformers builds them (3 experts, top-2).
_THIRD_PARTY_MOE = {
    "mixtral": dict(num_local_experts=3),
    "qwen2_moe": dict(num_experts=3, moe_intermediate_size=64, shared_expert_intermediate_size=64, norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=3, moe_intermediate_size=64, norm_topk_prob=True),
    "olmoe": dict(num_experts=3, norm_topk_prob=True),
    "granitemoe": dict(num_local_experts=3),
    # GLM-4.5 as released: the first layer dense, a shared expert, sigmoid scores with a selection bias
    "glm4_moe": dict(
        n_routed_experts=3,
        n_shared_experts=1,
        moe_intermediate_size=64,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        num_nextn_predict_layers=0,
    ),
}
THIRD_PARTY_MOE_TYPES = tuple(_THIRD_PARTY_MOE)


def build_tiny_moe(
    out_dir: Path, moe_type: str, fused: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Save a random tiny MoE of ``moe_type`` (3 experts, top-2) with a tokenizer, as another tool would have made it.

    ``fused`` saves transformers 5's in-memory layout (``save_original_format=False``: stacked
    ``experts.gate_up_proj``/``down_proj``), as some merging tools write; otherwise the per-expert
    hub layout.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = tiny_config(
        moe_type, vocab_size=len(tokenizer), initializer_range=0.2, num_experts_per_tok=2, **_THIRD_PARTY_MOE[moe_type]
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(dtype).save_pretrained(out_dir, save_original_format=not fused)
    return out_dir


def perturb_model(model_dir: Path, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every weight of a saved model, in place (stands in for branch training)."""
    from safetensors.torch import load_file, save_file

    generator = torch.Generator().manual_seed(seed)
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        tensors = load_file(path)
        noisy = {
            k: (v.float() + torch.randn(v.shape, generator=generator) * scale).to(v.dtype) for k, v in tensors.items()
        }
        path.unlink()  # never write into a file that may be hard-linked to the seed
        save_file(noisy, path, metadata={"format": "pt"})


def domain_corpus(domain: str, num_lines: int = 200, seed: int = 0) -> str:
    """Generated text for the synthetic domains 'code', 'math' and 'prose'."""
    rng = random.Random(f"{domain}-{seed}")
    lines = []
    for i in range(num_lines):
        if domain == "code":
            lines.append(f"def f{i}(x):\n    return x * {rng.randint(0, 99)} + {rng.randint(0, 9)}")
        elif domain == "math":
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}")
        elif domain == "prose":
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + ".")
        else:
            raise ValueError(f"unknown synthetic domain {domain!r}")
    return "\n".join(lines) + "\n"
