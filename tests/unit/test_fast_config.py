"""mix's JSON-only config path gives the config transformers' own classes give, for every family."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from moekit.arch import get_adapter
from moekit.config import MixConfig
from moekit.steps.mix.output import _json_is_complete, build_moe_config
from moekit.steps.mix.plan import plan_block
from tests.conftest import FAMILY_TARGETS

IGNORED = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def _loaded(data: dict, tmp_path, name: str) -> dict:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(data))
    return {k: v for k, v in AutoConfig.from_pretrained(tmp_path / name).to_dict().items() if k not in IGNORED}


def _plan(adapter, tmp_path, **options):
    """The block plan of a 3-source mix with top-2 routing (and ``options``)."""
    return plan_block(MixConfig(out=tmp_path / "out", seed="seed", **options), adapter, 3, 64)


@pytest.mark.parametrize(("family", "target"), FAMILY_TARGETS)
def test_json_config_equals_the_transformers_config(family, target, make_seed, tmp_path):
    seed = make_seed(family, dtype=torch.bfloat16)
    adapter = get_adapter(family, target)
    assert _json_is_complete(
        json.loads((seed / "config.json").read_text()), adapter
    )  # configs transformers writes are complete
    plan = _plan(adapter, tmp_path)
    fast = build_moe_config(seed, adapter, plan, torch.bfloat16)
    exact = build_moe_config(seed, adapter, plan, torch.bfloat16, exact=True)
    assert fast["dtype"] == exact["dtype"] == "bfloat16"
    assert _loaded(fast, tmp_path, "fast") == _loaded(exact, tmp_path, "exact")


def test_a_legacy_config_takes_the_transformers_path(make_seed, tmp_path):
    """A transformers-4 style config without some keys: the defaults of the dense class are needed."""
    seed = make_seed("llama")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = json.loads((seed / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.pop("attention_dropout")
    config["rope_theta"] = rope["rope_theta"]
    (legacy / "config.json").write_text(json.dumps(config))
    adapter = get_adapter("llama")
    assert not _json_is_complete(config, adapter)
    built = build_moe_config(legacy, adapter, _plan(adapter, tmp_path), torch.float32)
    assert built["rope_theta"] == rope["rope_theta"] and built["attention_dropout"] == 0.0
