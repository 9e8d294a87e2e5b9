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
    assert families["olmo2"] == "flex_olmo" and families["granite"] == "granitemoe" and families["phi3"] == "mixtral"


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


def test_phi3_partial_rotary_refused():
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor"):
        get_adapter("phi3").check_dense({"rope_parameters": {"partial_rotary_factor": 0.5}}, [])


def test_phi3_views_split_fused_projections():
    from moekit.io.checkpoint import TensorInfo

    config = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
    stored = {
        "model.layers.0.self_attn.qkv_proj.weight": TensorInfo("s", "F32", (64, 32), 1000, 64 * 32 * 4),
        "model.layers.0.mlp.gate_up_proj.weight": TensorInfo("s", "F32", (128, 32), 9192, 128 * 32 * 4),
    }
    views = get_adapter("phi3").dense_views(config, stored)
    q, k, v = (views[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert (q.shape, k.shape, v.shape) == ((32, 32), (16, 32), (16, 32))
    assert (q.offset, k.offset, v.offset) == (1000, 1000 + 32 * 128, 1000 + 48 * 128)
    up = views["model.layers.0.mlp.up_proj.weight"]
    assert up.shape == (64, 32) and up.offset == 9192 + 64 * 128
    assert "model.layers.0.self_attn.qkv_proj.weight" not in views
