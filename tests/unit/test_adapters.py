"""The adapter registry and its refusals."""

import pytest

from moekit.arch import get_adapter, supported_families
from moekit.errors import UnsupportedArchitectureError


def test_required_families_are_registered():
    families = supported_families()
    assert families["llama"] == "mixtral"
    assert families["mistral"] == "mixtral"
    assert families["qwen2"] == "qwen2_moe"
    assert families["qwen3"] == "qwen3_moe"


def test_unknown_family_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter("gemma2")
    assert "gemma2" in info.value.message and "llama -> mixtral" in info.value.hint


def test_bias_refused_where_target_has_none():
    names = [f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(UnsupportedArchitectureError, match="bias"):
        get_adapter("llama").check_dense({}, names + ["model.layers.0.self_attn.q_proj.bias"])
    get_adapter("qwen2").check_dense({}, names + ["model.layers.0.self_attn.q_proj.bias"])  # Qwen2-MoE has qkv bias


def test_config_flag_refused():
    with pytest.raises(UnsupportedArchitectureError, match="mlp_bias"):
        get_adapter("llama").check_dense({"mlp_bias": True}, [])
