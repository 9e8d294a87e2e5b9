"""What ``mix`` writes besides the weights: config.json, provenance and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from moekit import __version__
from moekit.arch import ArchAdapter
from moekit.io.config_json import portable_config
from moekit.manifest import now_iso


def build_moe_config(seed_dir: Path, adapter: ArchAdapter, num_experts: int, top_k: int, dtype: torch.dtype) -> tuple[Any, dict[str, Any]]:
    """Build the MoE config object from the seed's config, and its portable config.json dict.

    The config goes through transformers' own config classes (so values are normalised and
    validated, e.g. legacy rope_theta -> rope_parameters), then gets the fix-ups older readers
    need: rope_theta/rope_scaling next to rope_parameters, torch_dtype next to dtype, every
    expert-count key the family's readers use, and head_dim as an integer.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    dense = AutoConfig.from_pretrained(seed_dir)
    kwargs = adapter.moe_config_kwargs(dense.to_dict(), num_experts, top_k)
    moe = CONFIG_MAPPING[adapter.moe_type](**kwargs)
    moe.architectures = [adapter.moe_architecture]
    moe.dtype = dtype
    data = moe.to_dict()
    data["head_dim"] = int(kwargs["head_dim"])
    return moe, portable_config(data)


def write_provenance(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``moekit.yaml``: how this model was made (inputs, options, versions)."""
    full = {"moekit_version": __version__, "created": now_iso(), **record}
    (out_dir / "moekit.yaml").write_text(yaml.safe_dump(full, sort_keys=False), encoding="utf-8")


def write_model_card(out_dir: Path, record: dict[str, Any], adapter: ArchAdapter, name: str) -> None:
    """Write a README.md model card into ``out_dir`` for the model that will be called ``name``."""
    rows = "\n".join(f"| {i} | {e['name']} | {e['kind']} | `{e['source']}` |" for i, e in enumerate(record["experts"]))
    routing = record["router"]
    init_stats = ""
    if routing.get("init_in_domain_top1"):
        init_stats = "\nShare of each domain's calibration tokens whose top-1 expert is its own, averaged over layers: " + ", ".join(
            f"{d} {v:.0%}" for d, v in routing["init_in_domain_top1"].items()
        ) + ".\n"
    card = f"""---
library_name: transformers
tags: [moe, mixture-of-experts, moekit, {'sparse-upcycling' if record['mode'] == 'upcycle' else 'btx'}]
base_model: {record['seed']}
---

# {name}

A {adapter.moe_architecture} Mixture-of-Experts model built by moekit
{'by sparse upcycling (every expert starts as a copy of the seed FFN)' if record['mode'] == 'upcycle' else 'with Branch-Train-MiX'}
from the dense {adapter.dense_type} model `{record['seed']}`.

| expert | name | from | source |
|---|---|---|---|
{rows}

- Attention, norms, embeddings and LM head: `{record['average']}` average of the branches (fp32, cast to {record['dtype']}).
- Routing: top-{record['top_k']} of {len(record['experts'])} experts; router initialised `{routing['init']}`.
  The router is new: fine-tune the model (router first) before judging it.{init_stats}
- {adapter.notes}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

Weights use the per-expert tensor names that transformers, vLLM and llama.cpp's converter read.
Full provenance: `moekit.yaml`.
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")
