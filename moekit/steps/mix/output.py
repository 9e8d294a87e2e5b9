"""What ``mix`` writes besides the weights: config.json, provenance and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.arch import ArchAdapter
from moekit.arch.base import COMMON_CONFIG_KEYS
from moekit.io.config_json import (
    dtype_name,
    load_config_json,
    portable_config,
    with_rope_parameters,
)
from moekit.steps.mix.plan import BlockPlan


def _json_is_complete(dense: dict[str, Any], adapter: ArchAdapter) -> bool:
    """Whether the seed's config.json itself holds every value the MoE config copies (no class defaults needed)."""
    needed = (*COMMON_CONFIG_KEYS, *adapter.extra_config_keys, "intermediate_size", "rope_parameters")
    return all(key in dense for key in needed)


def build_moe_config(
    seed_dir: Path, adapter: ArchAdapter, plan: BlockPlan, dtype: Any, exact: bool = False, attention: Any = None
) -> dict[str, Any]:
    """The MoE's portable config.json dict, built from the seed's config.

    When the seed's config.json holds every value the MoE copies (configs written by
    transformers do), the dict is built from the JSON alone: no transformers import, which is
    most of ``mix``'s start-up time. Otherwise (or with ``exact``) the config goes through
    transformers' own classes, which fill in the dense family's defaults; the two paths give the
    same loaded config (tested for every family). Then come the fix-ups older readers need:
    rope_theta/rope_scaling next to rope_parameters, torch_dtype next to dtype, every
    expert-count key the family's readers use, and head_dim as an integer. moekit's own family
    also gets ``auto_map`` (its modeling code ships with it) and the ``attention`` plan's keys.
    """
    data = _moe_config(seed_dir, adapter, plan, dtype, exact)
    if adapter.ships_modeling:
        from moekit.modeling import AUTO_MAP

        data["auto_map"] = dict(AUTO_MAP)
    if attention is not None:
        data.update(attention.config())
    return data


def _moe_config(seed_dir: Path, adapter: ArchAdapter, plan: BlockPlan, dtype: Any, exact: bool) -> dict[str, Any]:
    dense = with_rope_parameters(load_config_json(seed_dir))

    def kwargs_for(config: dict[str, Any]) -> dict[str, Any]:
        kwargs = adapter.moe_config_kwargs(
            config, plan.experts, plan.top_k, plan.expert_size, plan.shared_size, plan.config_scale
        )
        if plan.groups is not None and adapter.expert_group_keys is not None:
            kwargs.update(zip(adapter.expert_group_keys, plan.groups, strict=True))
        return kwargs

    if not exact and _json_is_complete(dense, adapter):
        data = {
            **kwargs_for(dense),
            "model_type": adapter.moe_type,
            "architectures": [adapter.moe_architecture],
            "dtype": dtype_name(dtype),
        }
        return portable_config(data, expert_count_keys=adapter.num_experts_keys)
    from transformers import CONFIG_MAPPING, AutoConfig

    if adapter.ships_modeling:
        from moekit.modeling import register

        register()
    kwargs = kwargs_for(AutoConfig.from_pretrained(seed_dir).to_dict())
    moe = CONFIG_MAPPING[adapter.moe_type](**kwargs)
    moe.architectures = [adapter.moe_architecture]
    data = moe.to_dict()
    data["dtype"] = dtype_name(dtype)
    data["head_dim"] = int(kwargs["head_dim"])
    return portable_config(data, expert_count_keys=adapter.num_experts_keys)


def copy_modeling_files(adapter: ArchAdapter, out_dir: Path) -> None:
    """Copy moekit's own family's modeling code next to the weights (targets that need it), for ``auto_map``."""
    if adapter.ships_modeling:
        import shutil

        from moekit.modeling import modeling_files

        for path in modeling_files():
            shutil.copyfile(path, out_dir / path.name)


def write_model_card(out_dir: Path, record: dict[str, Any], adapter: ArchAdapter, name: str) -> None:
    """Write a README.md model card into ``out_dir`` for the model that will be called ``name``."""
    rows = "\n".join(f"| {i} | {e['name']} | {e['kind']} | `{e['source']}` |" for i, e in enumerate(record["experts"]))
    routing = record["router"]
    init_stats = ""
    if routing.get("init_in_domain_top1"):
        init_stats = (
            "\nShare of each domain's calibration tokens whose top-1 expert is its own, averaged over layers: "
            + ", ".join(f"{d} {v:.0%}" for d, v in routing["init_in_domain_top1"].items())
            + ".\n"
        )
    upcycled = record["mode"] == "upcycle"
    how = "by sparse upcycling (every expert starts as a copy of the seed FFN)" if upcycled else "with Branch-Train-MiX"
    card = f"""---
library_name: transformers
tags: [moe, mixture-of-experts, moekit, {"sparse-upcycling" if record["mode"] == "upcycle" else "btx"}]
base_model: {record["seed"]}
---

# {name}

A {adapter.moe_architecture} Mixture-of-Experts model built by moekit
{how}
from the dense {adapter.dense_type} model `{record["seed"]}`.

| expert | name | from | source |
|---|---|---|---|
{rows}

- {_attention_words(record)}Norms, embeddings and LM head: {_merge_words(record)} (fp32, cast to {record["dtype"]}).
- Routing: top-{record["top_k"]} of {len(record["experts"])} experts; router initialised `{routing["init"]}`.
  The router is new: fine-tune the model (router first) before judging it.{init_stats}
- {adapter.notes}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}"{_remote_code(adapter)})
tokenizer = AutoTokenizer.from_pretrained("{name}")
```

{_readers(adapter)}
Full provenance: `moekit.yaml`.
"""
    (out_dir / "README.md").write_text(card, encoding="utf-8")


def _remote_code(adapter: ArchAdapter) -> str:
    return ", trust_remote_code=True" if adapter.ships_modeling else ""


def _readers(adapter: ArchAdapter) -> str:
    """Which readers load the model, for the model card."""
    if adapter.ships_modeling:
        return (
            "This is moekit's own model family (`moekit_moe`): its modeling code ships with the weights\n"
            "(`modeling_moekit_moe.py`), so transformers 4.57 and 5 load it with `trust_remote_code=True`\n"
            "(moekit's commands load it without). vLLM and llama.cpp cannot read it."
        )
    return (
        "Weights use the per-expert tensor names that transformers, vLLM and llama.cpp's converter read.\n"
        "Serve it with vLLM: `vllm serve <this directory>` (an OpenAI-compatible server)."
    )


def _attention_words(record: dict[str, Any]) -> str:
    """The attention experts' line of the model card (empty without them)."""
    attention = record.get("attention_experts")
    if not attention:
        return "Attention, "
    routing = (
        "soft routing over all of them"
        if not attention["attention_top_k"]
        else (f"top-{attention['attention_top_k']} routing")
    )
    kv = "shared (averaged) key/value projections" if attention["attention_kv"] == "shared" else "its own key/value"
    return (
        f"Attention experts (Branch-Attend-Mix): each source's attention ({', '.join(attention['names'])}) is an "
        f"expert with its own query/output projections and {kv}; a router per layer, {routing}.\n- "
    )


def _merge_words(record: dict[str, Any]) -> str:
    """How the shared tensors were merged, in words, for the model card."""
    merge = record.get("merge") or {"method": "mean"}
    if merge["method"] == "mean":
        return f"`{record['average']}` average of the branches"
    knobs = f"scale {merge['scale']}" + (
        f", density {merge['density']}" if merge["method"] != "task-arithmetic" else ""
    )
    return f"the seed plus the branches' deltas merged by `{merge['method']}` ({knobs})"
