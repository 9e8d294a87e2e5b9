"""Targets with a selection bias (GLM-4.5, ERNIE 4.5), ``--seed-as shared`` and ``--split``: each keeps the
identical-branches invariant, loads cleanly, and puts the right weights in the right slots."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.arch import get_adapter
from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.errors import InvalidOptionError, UnsupportedArchitectureError
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import perturb_model
from tests.conftest import FAMILY_TARGETS, assert_clean_load, load

NEW_TARGETS = [("llama", "glm4_moe"), ("qwen2", "glm4_moe"), ("qwen3", "glm4_moe"), ("llama", "ernie4_5_moe")]
SHARED_TARGETS = [
    ("qwen2", "qwen2_moe"),
    ("llama", "glm4_moe"),
    ("qwen2", "glm4_moe"),
    ("qwen3", "glm4_moe"),
    ("llama", "ernie4_5_moe"),
]


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _mix_identical(
    make_seed, tmp_path, family: str, target: str | None = None, dtype=torch.float32, seed_options=None, **options
):
    seed = make_seed(family, dtype=dtype, **(seed_options or {}))
    run = branch(str(seed), tmp_path / "run", ["code", "math", "wiki"])
    result = mix(
        MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target=target, **options)
    )
    return seed, result


def _assert_reproduces_seed(seed, out, atol: float = 1e-5) -> None:
    moe, info = load(out)
    assert_clean_load(info)
    dense, _ = load(seed)
    assert torch.allclose(_logits(moe), _logits(dense), atol=atol), float((_logits(moe) - _logits(dense)).abs().max())


@pytest.mark.parametrize(("family", "target"), NEW_TARGETS)
def test_bias_targets_reproduce_the_seed(family, target, make_seed, tmp_path):
    seed, result = _mix_identical(make_seed, tmp_path, family, target)
    _assert_reproduces_seed(seed, result.out)
    moe = Checkpoint(result.out)
    adapter = get_adapter(family, target)
    bias = moe.tensors[adapter.selection_bias_name(0)]
    assert (
        bias.dtype == "F32" and moe.tensors[adapter.router_name(0)].dtype == "F32"
    )  # as transformers keeps them in memory
    assert not moe.get(adapter.selection_bias_name(0)).any()


@pytest.mark.parametrize(("family", "target"), SHARED_TARGETS)
def test_seed_as_shared_reproduces_the_seed(family, target, make_seed, tmp_path):
    """The seed's FFN is the shared expert; routed and shared halves add up to exactly the seed's output."""
    seed, result = _mix_identical(make_seed, tmp_path, family, target, seed_as="shared")
    _assert_reproduces_seed(seed, result.out)
    assert result.experts == ["code", "math", "wiki"]  # the seed is not a routed expert
    adapter = get_adapter(family, target)
    moe, dense = Checkpoint(result.out), Checkpoint(seed)
    shared = adapter.shared_expert_names(1)
    assert torch.equal(moe.get(shared["gate_proj"]), dense.get("model.layers.1.mlp.gate_proj.weight"))  # copied as is
    record = json.loads(json.dumps(__import__("yaml").safe_load((result.out / "moekit.yaml").read_text())))
    assert record["shared_expert"] == "seed"


def test_seed_as_shared_without_a_shared_expert_is_refused(make_seed, tmp_path):
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code"])
    with pytest.raises(InvalidOptionError, match="glm4_moe"):
        mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), seed_as="shared"))
    assert not (tmp_path / "moe").exists()


def test_a_target_the_family_cannot_reach_is_refused(make_seed, tmp_path):
    seed = make_seed("mistral")
    run = branch(str(seed), tmp_path / "run", ["code"])
    with pytest.raises(UnsupportedArchitectureError, match="Targets for mistral: mixtral"):
        mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target="glm4_moe"))


def test_a_sliding_window_qwen2_is_refused_for_glm4_moe(make_seed, tmp_path):
    seed = make_seed("qwen2", use_sliding_window=True, sliding_window=8)
    run = branch(str(seed), tmp_path / "run", ["code"])  # its default target (Qwen2-MoE) has sliding windows
    with pytest.raises(UnsupportedArchitectureError, match="use_sliding_window"):
        mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target="glm4_moe"))


def test_a_tied_bf16_seed_gets_an_explicit_head_for_glm4_moe(make_seed, tmp_path):
    """vLLM's Glm4Moe needs lm_head.weight: it is the averaged embedding, and the logits stay the seed's."""
    seed, result = _mix_identical(
        make_seed, tmp_path, "llama", "glm4_moe", dtype=torch.bfloat16, seed_options={"tie_word_embeddings": True}
    )
    moe = Checkpoint(result.out)
    assert moe.config["tie_word_embeddings"] is False
    assert torch.equal(moe.get("lm_head.weight"), moe.get("model.embed_tokens.weight"))
    moe_model, info = load(result.out)
    assert_clean_load(info)
    dense, _ = load(seed)
    assert torch.allclose(_logits(moe_model.float()), _logits(dense.float()), atol=1e-4)


@pytest.mark.parametrize(
    ("family", "target", "split", "seed_as"),
    [
        ("llama", "mixtral", 2, "routed"),
        ("granite", "granitemoe", 4, "routed"),
        ("llama", "glm4_moe", 4, "routed"),
        ("qwen2", "qwen2_moe", 2, "shared"),
        ("llama", "ernie4_5_moe", 2, "shared"),
        ("qwen3", "glm4_moe", 2, "shared"),
    ],
)
def test_split_experts_reproduce_the_seed(family, target, split, seed_as, make_seed, tmp_path):
    """Fine-grained experts: each FFN cut in ``split`` chunks, routed top-(k x split) with a router row per source."""
    seed, result = _mix_identical(make_seed, tmp_path, family, target, split=split, seed_as=seed_as)
    _assert_reproduces_seed(seed, result.out)
    adapter = get_adapter(family, target)
    moe = Checkpoint(result.out)
    sources = 3 + (seed_as == "routed")
    assert moe.get(adapter.router_name(0)).shape[0] == sources * split
    config = moe.config
    assert config[adapter.top_k_key] == 2 * split
    assert config[adapter.expert_size_key] == Checkpoint(seed).config["intermediate_size"] // split
    router = moe.get(adapter.router_name(0)).view(sources, split, -1)
    assert torch.equal(router, router[:, :1].expand_as(router))  # the chunks of one FFN are chosen together


def test_split_chunks_hold_the_right_slices(make_seed, tmp_path):
    """Distinct branches: expert e is chunk e % C of source e // C (gate/up rows copied bit for bit, down columns)."""
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1)
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), split=2)).out
    written = load_file(next(out.glob("*.safetensors")))
    adapter = get_adapter("llama")
    sources = [Checkpoint(p) for p in run.branches.values()] + [Checkpoint(seed)]
    width = sources[0].get("model.layers.0.mlp.gate_proj.weight").shape[0] // 2
    for expert in range(6):
        source, chunk = divmod(expert, 2)
        rows = slice(chunk * width, (chunk + 1) * width)
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(
                written[adapter.expert_name(1, expert, proj)],
                sources[source].get(f"model.layers.1.mlp.{proj}.weight")[rows],
            )
        down = (
            sources[source].get("model.layers.1.mlp.down_proj.weight")[:, rows] * 2
        )  # renormalised chunk weights are 1/2
        assert torch.equal(written[adapter.expert_name(1, expert, "down_proj")], down)


def test_split_must_divide_the_ffn(make_seed, tmp_path):
    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code"])
    with pytest.raises(InvalidOptionError, match="does not divide"):
        mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), split=3))


def test_cli_targets_seed_as_and_split(make_seed, tmp_path):
    seed = make_seed("qwen3")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    result = CliRunner().invoke(
        build_app(),
        [
            "mix",
            str(run.run_dir),
            "--target",
            "glm4_moe",
            "--seed-as",
            "shared",
            "--split",
            "2",
            "--out",
            str(tmp_path / "moe"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 routed experts (code.0, code.1, math.0, math.1)" in result.output.replace("\n", " ")
    bad = CliRunner().invoke(
        build_app(), ["mix", str(run.run_dir), "--seed-as", "shared", "--no-seed-expert", "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code != 0 and "contradicts" in bad.output


@pytest.mark.parametrize(("family", "target"), [t for t in FAMILY_TARGETS if t in NEW_TARGETS])
def test_bias_targets_copy_experts_bit_for_bit_in_bf16(family, target, make_seed, tmp_path):
    seed = make_seed(family, dtype=torch.bfloat16)
    run = branch(str(seed), tmp_path / "run", ["code"])
    perturb_model(run.branches["code"], seed=5, scale=0.05)
    out = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), experts=list(run.branches.items()), target=target)).out
    adapter, moe, source = get_adapter(family, target), Checkpoint(out), Checkpoint(run.branches["code"])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        got, want = moe.get(adapter.expert_name(1, 0, proj)), source.get(f"model.layers.1.mlp.{proj}.weight")
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))
