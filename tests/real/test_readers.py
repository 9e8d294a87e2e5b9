"""Real readers load what moekit writes: transformers 4.57 (every family) and llama.cpp's converter.

Outputs are built here from bf16 seeds with tied embeddings (the common real case): the MoE of
every family, plus a trained dense branch and a tuned MoE. The transformers 4.57 venv (what
older stacks, vLLM images and llama.cpp's converter pin) must load each with empty loading info,
give the logits transformers 5 gives, and tokenize as the tokenizer.json does. llama.cpp's
converter must turn the Mixtral and Qwen3-MoE outputs (with a real tokenizer it recognises:
SmolLM2's) into GGUF files with the right expert metadata and the experts in the right slots;
so must the Qwen2-MoE and GraniteMoE outputs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moekit.arch import layouts_for_moe
from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import build_tiny_model, domain_corpus, perturb_model
from tests.assets import llama_cpp_converter, reader_python, smollm2_checkpoint
from tests.conftest import FAMILIES, FAMILY_OVERRIDES

TEXT = "def f(x):\n    return x + 1\nThe answer is 42."
READER_SCRIPT = Path(__file__).with_name("reader_load.py")


def _moe_from(seed: Path, out: Path, **options) -> Path:
    """A 3-expert top-2 MoE of two perturbed branches of ``seed`` and the seed expert."""
    run = branch(str(seed), out.parent / f"{out.name}-run", ["code", "math"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.02)
    return mix(MixConfig(out=out, seed=str(seed), experts=list(run.branches.items()), **options)).out


def _trained_outputs(root: Path) -> dict[str, Path]:
    """A dense branch trained by `moekit train` and a MoE tuned by `moekit tune` (llama family)."""
    seed = build_tiny_model(root / "trained-seed", "llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    (root / "code.txt").write_text(domain_corpus("code", 200))
    loop = [
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--lr",
        "3e-3",
        "--eval-every",
        "0",
        "--eval-blocks",
        "1",
    ]
    runner = CliRunner()
    for args in (
        ["branch", seed, root / "run", "--domain", "code"],
        ["train", root / "run", "--data", f"code={root / 'code.txt'}", *loop],
        ["mix", root / "run"],
        ["tune", root / "run", *loop],
    ):
        result = runner.invoke(build_app(), [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return {"llama-trained-branch": root / "run" / "branches" / "code", "mixtral-tuned": root / "run" / "tuned"}


EXTRA_TARGETS = {  # family -> (target, seed_as) built besides the default target
    "llama": [("glm4_moe", "routed"), ("ernie4_5_moe", "shared")],
    "qwen2": [("glm4_moe", "shared")],
    "qwen3": [("glm4_moe", "routed")],
}
BAM_OUTPUTS = [("llama", "shared"), ("qwen3", "expert"), ("qwen2", "expert"), ("granite", "shared")]
BAM_NAMES = [f"{family}-bam-{kv}" for family, kv in BAM_OUTPUTS]
EXTRA_NAMES = [f"{family}-{target}-{seed_as}" for family, pairs in EXTRA_TARGETS.items() for target, seed_as in pairs]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    made = {}
    for family in FAMILIES:
        seed = build_tiny_model(
            root / f"{family}-seed",
            family,
            dtype=torch.bfloat16,
            tie_word_embeddings=True,
            **FAMILY_OVERRIDES.get(family, {}),
        )
        made[f"{family}-moe"] = _moe_from(seed, root / f"{family}-moe")
        for target, seed_as in EXTRA_TARGETS.get(family, []):  # the bias-bearing targets, routed and shared seed
            made[f"{family}-{target}-{seed_as}"] = _moe_from(
                seed, root / f"{family}-{target}-{seed_as}", target=target, seed_as=seed_as
            )
    made.update(_trained_outputs(root))
    for family, kv in BAM_OUTPUTS:  # moekit's own family: loaded with trust_remote_code=True
        seed = root / f"{family}-seed"
        made[f"{family}-bam-{kv}"] = _moe_from(
            seed, root / f"{family}-bam-{kv}", attention_experts=True, attention_kv=kv
        )
    return made


@pytest.fixture(scope="module")
def reader_results(outputs, tmp_path_factory) -> dict[str, dict]:
    """Load every output in the transformers 4.57 venv, once; results by output name."""
    root = tmp_path_factory.mktemp("reader")
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, root / "ids.pt")
    jobs = []
    for name, model_dir in outputs.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.save(model(ids).logits, root / f"{name}.pt")
        jobs.append(
            {
                "name": name,
                "model": str(model_dir),
                "ids": str(root / "ids.pt"),
                "logits": str(root / f"{name}.pt"),
                "text": TEXT,
                "remote_code": (model_dir / "modeling_moekit_moe.py").is_file(),
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    subprocess.run(
        [str(reader_python()), str(READER_SCRIPT), str(root / "jobs.json"), str(root / "results.json")],
        check=True,
        timeout=900,
    )
    results = json.loads((root / "results.json").read_text())
    assert results["transformers"].startswith("4.57")
    return {job["name"]: result for job, result in zip(jobs, results["models"], strict=True)}


@pytest.mark.parametrize(
    "name", [f"{f}-moe" for f in FAMILIES] + EXTRA_NAMES + BAM_NAMES + ["llama-trained-branch", "mixtral-tuned"]
)
def test_transformers_4_57_loads_the_output(name, outputs, reader_results):
    result = reader_results[name]
    assert "error" not in result, result.get("error")
    assert all(not v for v in result["loading_info"].values()), result["loading_info"]
    assert result["max_abs_diff"] < 1e-4, result["max_abs_diff"]
    assert result["token_ids"] == Tokenizer.from_file(str(outputs[name] / "tokenizer.json")).encode(TEXT).ids
    if name in BAM_NAMES:  # transformers 4.57 ran the modeling code shipped in the output directory
        assert result["module"].startswith("transformers_modules."), result["module"]


# --- llama.cpp's converter -----------------------------------------------------------------

_BLOCK = {
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate_inp",
    "ffn_gate_exps",
    "ffn_up_exps",
    "ffn_down_exps",
}
_SHARED = {"ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}
GGUF_EXPECTED = {  # seed family -> (GGUF architecture, key of each expert's FFN size, tensors of one block)
    "llama": ("llama", "feed_forward_length", _BLOCK),
    "mistral": ("llama", "feed_forward_length", _BLOCK),
    "phi3": ("llama", "feed_forward_length", _BLOCK),
    "qwen3": ("qwen3moe", "expert_feed_forward_length", _BLOCK | {"attn_q_norm", "attn_k_norm"}),
    "qwen2": (
        "qwen2moe",
        "expert_feed_forward_length",
        _BLOCK | _SHARED | {"attn_q.bias", "attn_k.bias", "attn_v.bias"},
    ),
    "granite": ("granitemoe", "feed_forward_length", _BLOCK),
}
# olmo2 -> flex_olmo is not converted: llama.cpp's converter refuses FlexOlmoForCausalLM (docs/formats.md).


def _expert_gates(moe: Path, layer: int) -> torch.Tensor:
    """Each expert's gate projection [E, I, H] of ``layer``, read in whichever layout the MoE stores."""
    checkpoint = Checkpoint(moe)
    layouts = layouts_for_moe(checkpoint.model_type)
    layout = layouts.detect(checkpoint.tensors) if layouts else None
    assert layout is not None
    experts = checkpoint.tensors[layout.router_name(layer)].shape[0]
    if layout.per_expert is not None:
        return torch.stack(
            [
                checkpoint.get(layout.per_expert["gate_proj"].format(layer=layer, expert=e)).float()
                for e in range(experts)
            ]
        )
    assert layout.stacked is not None
    gate_up = checkpoint.get(layout.stacked[0].format(layer=layer)).float()
    return gate_up[:, : gate_up.shape[1] // 2]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """MoE outputs (with SmolLM2's tokenizer, which the converter recognises) and their GGUF conversions, by seed
    family."""
    root = tmp_path_factory.mktemp("gguf")
    converter = llama_cpp_converter() / "convert_hf_to_gguf.py"
    files = {}
    for family in GGUF_EXPECTED:
        seed = build_tiny_model(
            root / f"{family}-seed",
            family,
            dtype=torch.bfloat16,
            tie_word_embeddings=True,
            tokenizer_dir=smollm2_checkpoint(),
            **FAMILY_OVERRIDES.get(family, {}),
        )
        moe = _moe_from(seed, root / f"{family}-moe")
        out = root / f"{family}.gguf"
        done = subprocess.run(
            [str(reader_python()), str(converter), str(moe), "--outfile", str(out), "--outtype", "f32"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        files[family] = (moe, out)
    return files


def _field(reader, key: str):
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]].tolist()


@pytest.mark.parametrize("family", list(GGUF_EXPECTED))
def test_llama_cpp_converts_the_moe(family, gguf_files):
    from gguf import GGUFReader

    moe, gguf_path = gguf_files[family]
    arch, ffn_key, block = GGUF_EXPECTED[family]
    config = json.loads((moe / "config.json").read_text())
    reader = GGUFReader(gguf_path)
    assert _field(reader, "general.architecture") == arch
    experts = config.get("num_local_experts") or config["num_experts"]
    assert _field(reader, f"{arch}.expert_count") == experts == 3
    assert _field(reader, f"{arch}.expert_used_count") == config["num_experts_per_tok"] == 2
    assert _field(reader, f"{arch}.{ffn_key}") == config.get("moe_intermediate_size", config["intermediate_size"])
    layers = config["num_hidden_layers"]
    tensors = {t.name: t for t in reader.tensors}
    assert {n.removeprefix("blk.0.").removesuffix(".weight") for n in tensors if n.startswith("blk.0.")} == block
    assert len(tensors) == 2 + len(block) * layers  # + token_embd and output_norm (tied: no output.weight)
    # the experts arrive in the right slots: GGUF's stacked gate tensor of layer 0 = each expert's gate projection
    gate = np.asarray(tensors["blk.0.ffn_gate_exps.weight"].data)
    np.testing.assert_array_equal(gate, _expert_gates(moe, 0).numpy())
