"""config.json fix-ups that make a checkpoint readable beyond the transformers version that wrote it.

transformers 5 writes ``rope_parameters`` and ``dtype`` only; older readers (transformers 4.x,
vLLM, llama.cpp's converter) look for ``rope_theta``/``rope_scaling``, ``torch_dtype``, an
integer ``head_dim`` and, for Qwen MoEs, ``num_experts`` (docs/reference.md §5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.io.floats import NAMES


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 (or the code "BF16", or "bfloat16" itself), and so on."""
    if isinstance(dtype, str):
        return NAMES.get(dtype, dtype.removeprefix("torch."))
    return str(dtype).removeprefix("torch.")


def portable_config(data: dict[str, Any], dtype: Any = None, expert_count_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Add the keys older readers need next to transformers 5's; set the dtype to ``dtype`` if given.

    rope_theta/rope_scaling next to rope_parameters, torch_dtype next to dtype, an integer
    head_dim, and for MoEs every expert-count key the family's readers use
    (``expert_count_keys``, from the family's adapter: vLLM reads num_experts for Qwen MoEs).
    """
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
    experts = next((data[k] for k in ("num_local_experts", "num_experts") if data.get(k)), None)
    if experts:
        for key in expert_count_keys:
            data[key] = experts
    return data


def write_config_json(model_dir: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as ``model_dir/config.json`` (sorted keys, as moekit writes every config)."""
    (Path(model_dir) / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_config_portable(model_dir: Path, dtype: Any = None, expert_count_keys: tuple[str, ...] = ()) -> None:
    """Rewrite ``model_dir/config.json`` (as save_pretrained wrote it) with the portability keys.

    ``dtype``: the dtype the weights were saved in (save_pretrained records the in-memory one).
    """
    path = Path(model_dir) / "config.json"
    write_config_json(
        model_dir, portable_config(json.loads(path.read_text(encoding="utf-8")), dtype, expert_count_keys)
    )


def load_config_json(model_dir: Path) -> dict[str, Any]:
    """``model_dir/config.json`` as a dict (plain JSON: no transformers import)."""
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))


def with_rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """A config with transformers-4 ``rope_theta``/``rope_scaling`` folded into transformers 5's ``rope_parameters``.

    Only the plain cases; anything else is left as is (callers fall back to transformers then).
    """
    if "rope_parameters" in config:  # rope_theta/rope_scaling next to it are copies for older readers
        return {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    if "rope_theta" not in config and "rope_scaling" not in config:
        return config
    result = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    scaling = config.get("rope_scaling") or {}
    parameters = {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    parameters.pop("type", None)
    if "rope_theta" in config:
        parameters["rope_theta"] = config["rope_theta"]
    result["rope_parameters"] = parameters
    return result
