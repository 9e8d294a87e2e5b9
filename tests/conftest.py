"""Shared fixtures: tiny dense models built locally (no downloads), cached per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from moekit.tiny import build_tiny_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "phi3")
# Every (dense family, MoE target) pair moekit builds, default targets included.
FAMILY_TARGETS = (
    ("llama", "mixtral"),
    ("mistral", "mixtral"),
    ("qwen2", "qwen2_moe"),
    ("qwen3", "qwen3_moe"),
    ("olmo2", "flex_olmo"),
    ("granite", "granitemoe"),
    ("phi3", "mixtral"),
    ("llama", "glm4_moe"),
    ("qwen2", "glm4_moe"),
    ("qwen3", "glm4_moe"),
    ("llama", "ernie4_5_moe"),
)
# Non-default settings that a mix must carry over, or the equal-logits invariant breaks.
FAMILY_OVERRIDES = {
    "granite": dict(embedding_multiplier=1.5, residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=2.0),
    "mistral": dict(sliding_window=8),
}


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide directory of built tiny seeds."""
    return tmp_path_factory.mktemp("seeds")


@pytest.fixture(scope="session")
def make_seed(model_cache: Path):
    """Factory: a tiny seed of a family (built once per session per argument set), copied to ``dest``."""

    def _make(family: str = "llama", dest: Path | None = None, **overrides) -> Path:
        overrides = {**FAMILY_OVERRIDES.get(family, {}), **overrides}
        key = family + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        cached = model_cache / key
        if not cached.exists():
            build_tiny_model(cached, family, **overrides)
        if dest is None:
            return cached
        shutil.copytree(cached, dest)
        return dest

    return _make


@pytest.fixture()
def seed_and_moe(make_seed, tmp_path) -> dict[str, Path]:
    """A tiny llama seed and a 3-expert Mixtral of two perturbed branches of it (code, math, seed)."""
    from moekit.config import MixConfig
    from moekit.steps.branch import branch
    from moekit.steps.mix import mix
    from moekit.tiny import perturb_model

    seed = make_seed("llama")
    run = branch(str(seed), tmp_path / "run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    moe = mix(MixConfig(out=tmp_path / "mixed", seed=str(seed), experts=list(run.branches.items()))).out
    return {"seed": seed, "moe": moe}


def load(model_dir: Path):
    """Load a causal LM and return (model, loading info)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)


def assert_clean_load(info: dict) -> None:
    """No missing, unexpected or mismatched keys and no errors."""
    assert all(len(v) == 0 for v in info.values()), info


def assert_added_expert_is_the_branch(grown_dir: Path, branch_dir: Path) -> None:
    """The expert ``mix --add-expert`` appended holds the branch's FFN exactly (down projection times the MoE's
    routed scale), in every layer, in per-expert and stacked layouts alike."""
    import yaml

    from moekit.arch import get_adapter
    from moekit.io.checkpoint import Checkpoint

    grown, branch = Checkpoint(grown_dir), Checkpoint(branch_dir)
    added = yaml.safe_load((Path(grown_dir) / "moekit.yaml").read_text())["added"]
    index, scale = int(added["expert_index"]), float(added["down_scale"])
    adapter = get_adapter(branch.model_type, grown.model_type)
    for layer in range(int(grown.config["num_hidden_layers"])):
        dense = {p: branch.get(adapter.dense_ffn_name(layer, p)) for p in ("gate_proj", "up_proj", "down_proj")}
        dense["down_proj"] = (dense["down_proj"].float() * scale).to(dense["down_proj"].dtype)
        if adapter.fused_experts is None:
            got = {p: grown.get(adapter.expert_name(layer, index, p)) for p in dense}
        else:
            gate_up, down = (
                grown.get(f"model.layers.{layer}.{adapter.moe_block}.{n}")[index] for n in adapter.fused_experts
            )
            rows = dense["gate_proj"].shape[0]
            got = {"gate_proj": gate_up[:rows], "up_proj": gate_up[rows:], "down_proj": down}
        for projection, expected in dense.items():
            assert torch.equal(got[projection], expected.to(got[projection].dtype)), (layer, projection)


def crash_tune_at(monkeypatch, step: int) -> None:
    """Make the next ``tune`` raise KeyboardInterrupt at the end of ``step`` (a crash mid-run); undo with
    ``monkeypatch.undo()`` or by patching again."""
    import moekit.steps.tune.run as tune_step

    real = getattr(tune_step.run_loop, "_real", tune_step.run_loop)

    def crashing(job, engine):
        job.on_step_end = lambda done, row: (_ for _ in ()).throw(KeyboardInterrupt) if done == step else None
        return real(job, engine)

    crashing._real = real  # type: ignore[attr-defined]
    monkeypatch.setattr(tune_step, "run_loop", crashing)
