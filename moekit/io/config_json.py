"""config.json fix-ups that make a checkpoint readable beyond the transformers version that wrote it.

transformers 5 writes ``rope_parameters`` and ``dtype`` only; older readers (transformers 4.x,
vLLM, llama.cpp's converter) look for ``rope_theta``/``rope_scaling``, ``torch_dtype``, an
integer ``head_dim`` and, for Qwen MoEs, ``num_experts`` (REFERENCE.md section 5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16, and so on."""
    return str(dtype).removeprefix("torch.")


def portable_config(data: dict[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Add the keys older readers need next to transformers 5's; set the dtype to ``dtype`` if given.

    rope_theta/rope_scaling next to rope_parameters, torch_dtype next to dtype, an integer
    head_dim, and for MoEs every expert-count key the family's readers use (vLLM reads
    num_experts for Qwen MoEs).
    """
    from moekit.arch import adapter_for_moe

    data = dict(data)
    rope = data.get("rope_parameters") or {}
    if "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        data["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if dtype is not None:
        data["dtype"] = dtype_name(dtype)
    if data.get("dtype"):
        data["torch_dtype"] = str(data["dtype"]).removeprefix("torch.")
        data["dtype"] = data["torch_dtype"]
    if data.get("head_dim") is not None:
        data["head_dim"] = int(data["head_dim"])
    adapter = adapter_for_moe(str(data.get("model_type", "")))
    experts = next((data[k] for k in ("num_local_experts", "num_experts") if data.get(k)), None)
    if adapter is not None and experts:
        for key in adapter.num_experts_keys:
            data[key] = experts
    return data


def write_config_json(model_dir: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as ``model_dir/config.json`` (sorted keys, as moekit writes every config)."""
    (Path(model_dir) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_config_portable(model_dir: Path, dtype: torch.dtype | None = None) -> None:
    """Rewrite ``model_dir/config.json`` (as save_pretrained wrote it) with the portability keys.

    ``dtype``: the dtype the weights were saved in (save_pretrained records the in-memory one).
    """
    path = Path(model_dir) / "config.json"
    write_config_json(model_dir, portable_config(json.loads(path.read_text(encoding="utf-8")), dtype))
