"""Invariants of mix on tiny models of every supported family.

Equal branches must give exactly the seed's function; distinct branches must land bit-exactly
in the right expert slots, and every averaged tensor must be the fp32 mean of its inputs.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.arch import get_adapter
from moekit.config import MixConfig, UpcycleSettings
from moekit.io.checkpoint import Checkpoint
from moekit.models import open_dense_model
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import perturb_model
from tests.conftest import FAMILIES, assert_clean_load, load


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(model_dir)
    return {name: checkpoint.get(name) for name in checkpoint.tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_branches_reproduce_the_seed(family, make_seed, tmp_path):
    seed = make_seed(family)
    run = branch(str(seed), tmp_path / "run", ["code", "math", "wiki"])
    result = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items())))
    moe, info = load(result.out)
    assert_clean_load(info)
    dense, _ = load(seed)
    assert moe.config.model_type == get_adapter(family).moe_type
    assert moe.config.num_experts_per_tok == 2
    assert torch.allclose(_logits(moe), _logits(dense), atol=1e-5)


def expert_weight(adapter, written: dict[str, torch.Tensor], layer: int, expert: int, proj: str) -> torch.Tensor:
    """One expert's projection from a written MoE, whatever the target's expert layout."""
    if adapter.fused_experts is None:
        return written[adapter.expert_name(layer, expert, proj)]
    gate_up, down = (f"model.layers.{layer}.{adapter.moe_block}.{n}" for n in adapter.fused_experts)
    if proj == "down_proj":
        return written[down][expert]
    half = written[gate_up].shape[1] // 2
    return written[gate_up][expert, :half] if proj == "gate_proj" else written[gate_up][expert, half:]


def _dense_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """A dense model's tensors under the adapter's view names (fused projections split)."""
    checkpoint, _ = open_dense_model(model_dir)
    return {name: checkpoint.get(name) for name in checkpoint.tensors}


@pytest.mark.parametrize("family", ["llama", "qwen2", "granite", "phi3"])
def test_distinct_branches_land_in_their_slots(family, make_seed, tmp_path):
    seed = make_seed(family)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1)
    adapter = get_adapter(family)
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()))).out
    written = _all_tensors(out)
    sources = [_dense_tensors(p) for p in run.branches.values()] + [_dense_tensors(seed)]
    layers = Checkpoint(seed).config["num_hidden_layers"]
    for layer in range(layers):
        for expert, source in enumerate(sources):  # experts: code, math, then the seed
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(
                    expert_weight(adapter, written, layer, expert, proj), source[adapter.dense_ffn_name(layer, proj)]
                )
        assert written[adapter.router_name(layer)].shape == (3, Checkpoint(seed).config["hidden_size"])
    for name, tensor in sources[2].items():
        if ".mlp." in name:
            continue
        mean = (sources[0][name].float() + sources[1][name].float()) / 2
        assert torch.equal(written[name], mean.to(tensor.dtype)), name
    moe, info = load(out)
    assert_clean_load(info)


def test_weighted_and_seed_averaging(make_seed, tmp_path):
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["a", "b"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1)
    experts = list(run.branches.items())
    weighted = mix(
        MixConfig(out=tmp_path / "w", seed=str(seed), experts=experts, average="weighted", weights=[3, 1])
    ).out
    seeded = mix(MixConfig(out=tmp_path / "s", seed=str(seed), experts=experts, average="seed")).out
    a, b, s = (Checkpoint(p) for p in (*run.branches.values(), seed))
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = 0.75 * a.get(name).float() + 0.25 * b.get(name).float()
    assert torch.allclose(Checkpoint(weighted).get(name), expected, atol=1e-7)
    assert torch.equal(Checkpoint(seeded).get(name), s.get(name))


def test_no_seed_expert_and_bf16_output(make_seed, tmp_path):
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["a", "b"])
    cfg = MixConfig(
        out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), seed_as="none", dtype="bfloat16"
    )
    out = mix(cfg).out
    moe, info = load(out)
    assert_clean_load(info)
    assert moe.config.num_local_experts == 2
    assert all(t.dtype == torch.bfloat16 for t in _all_tensors(out).values())


def test_sharded_output_loads(make_seed, tmp_path):
    seed = make_seed("qwen3")
    run = branch(str(seed), tmp_path / "run", ["a", "b"])
    out = mix(
        MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), shard_size="40KB")
    ).out
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 2
    moe, info = load(out)
    assert_clean_load(info)
    assert torch.allclose(_logits(moe), _logits(load(seed)[0]), atol=1e-5)


def test_output_files_and_config_fixups(make_seed, tmp_path):
    import json

    seed = make_seed("qwen2")
    run = branch(str(seed), tmp_path / "run", ["a", "b"])
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()))).out
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 3
    assert config["norm_topk_prob"] is True
    assert isinstance(config["head_dim"], int)
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert "rope_theta" in config
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "moekit.yaml"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (seed / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert '"moe"' in card and ".tmp" not in card  # the card names the final directory
    shared = load_file(out / "model.safetensors")
    assert torch.count_nonzero(shared["model.layers.0.mlp.shared_expert.down_proj.weight"]) == 0
    assert not any(p.name.startswith(".moe") for p in tmp_path.iterdir())  # no temp dirs left


def test_upcycle_copies_and_drop_upcycling(make_seed, tmp_path):
    seed = make_seed("llama")
    adapter = get_adapter("llama")
    plain = mix(MixConfig(out=tmp_path / "up", seed=str(seed), upcycle=UpcycleSettings(num_experts=4))).out
    moe, info = load(plain)
    assert_clean_load(info)
    assert torch.allclose(_logits(moe), _logits(load(seed)[0]), atol=1e-5)
    dropped = mix(
        MixConfig(out=tmp_path / "drop", seed=str(seed), upcycle=UpcycleSettings(num_experts=4, drop_fraction=0.5))
    ).out
    original = Checkpoint(seed).get(adapter.dense_ffn_name(0, "gate_proj"))
    written = Checkpoint(dropped)
    changed_rows = []
    for expert in range(4):
        gate = written.get(adapter.expert_name(0, expert, "gate_proj"))
        changed = (gate != original).any(dim=1)
        assert int(changed.sum()) == original.shape[0] // 2  # exactly half the units re-drawn
        down = written.get(adapter.expert_name(0, expert, "down_proj"))
        down_original = Checkpoint(seed).get(adapter.dense_ffn_name(0, "down_proj"))
        assert torch.equal((down != down_original).any(dim=0), changed)  # same units in down_proj
        changed_rows.append(changed)
    assert not all(torch.equal(changed_rows[0], c) for c in changed_rows[1:])  # different subsets


def test_expert_scale_scales_the_moe_output(make_seed, tmp_path):
    seed = make_seed("llama")
    base = mix(MixConfig(out=tmp_path / "a", seed=str(seed), upcycle=UpcycleSettings(num_experts=2))).out
    scaled = mix(
        MixConfig(out=tmp_path / "b", seed=str(seed), upcycle=UpcycleSettings(num_experts=2), expert_scale=2.0)
    ).out
    name = get_adapter("llama").expert_name(1, 1, "down_proj")
    assert torch.equal(Checkpoint(scaled).get(name), Checkpoint(base).get(name) * 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_centroid_init_runs_for_every_family(family, make_seed, tmp_path):
    from moekit.tiny import domain_corpus

    seed = make_seed(family)
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    data = {}
    for domain in ("code", "math"):
        data[domain] = str(tmp_path / f"{domain}.txt")
        Path(data[domain]).write_text(domain_corpus(domain, 60))
    cfg = MixConfig(
        out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), router="centroid", router_data=data
    )
    result = mix(cfg)
    moe, info = load(result.out)
    assert_clean_load(info)
    assert torch.allclose(_logits(moe), _logits(load(seed)[0]), atol=1e-5)  # equal experts: routing cannot matter
    router = Checkpoint(result.out).get(get_adapter(family).router_name(1))
    assert torch.count_nonzero(router[0]) > 0 and not torch.equal(router[0], router[1])
    assert set(result.router_stats["init_in_domain_top1"]) == {"code", "math"}


def test_chunked_averaging_is_bit_exact(make_seed, tmp_path, monkeypatch):
    import moekit.steps.mix.build as mix_module

    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["a", "b"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1)
    experts = list(run.branches.items())
    whole = mix(MixConfig(out=tmp_path / "whole", seed=str(seed), experts=experts)).out
    monkeypatch.setattr(mix_module, "_CHUNK_ELEMENTS", 7)  # one row per chunk, ragged everywhere
    chunked = mix(MixConfig(out=tmp_path / "chunked", seed=str(seed), experts=experts)).out
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()
