"""``mix --attention-experts`` (BAM) and moekit's own model family, moekit_moe.

Invariants: identical branches give the seed's logits (both KV modes, every family that can carry
attention experts, GQA and plain multi-head); distinct branches give exactly the routed mixture
of each branch's own attention (checked against the dense family's attention modules); the KV
cache changes nothing; plain transformers loads the output with trust_remote_code and nothing
else. Then what the rest of moekit does with it, and what it refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.arch.moekit_moe import ATTENTION_FAMILIES
from moekit.cli import build_app
from moekit.config import MixConfig
from moekit.io.checkpoint import Checkpoint
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus, perturb_model
from tests.conftest import assert_clean_load, load

LOOP = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _ids(vocab: int, seed: int = 0, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _bam(seed: Path, root: Path, kv: str, distinct: bool, **options) -> tuple[Path, dict[str, Path]]:
    run = branch(str(seed), root / f"run-{kv}", ["code", "math"])
    if distinct:
        for i, path in enumerate(run.branches.values()):
            perturb_model(path, seed=i + 1, scale=0.05)
    cfg = MixConfig(
        out=root / f"bam-{kv}",
        seed=str(seed),
        experts=list(run.branches.items()),
        attention_experts=True,
        attention_kv=kv,
        **options,
    )
    return mix(cfg).out, run.branches


@pytest.mark.parametrize("kv", ["shared", "expert"])
@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_identical_branches_give_the_seed(family, kv, make_seed, tmp_path):
    seed = make_seed(family)
    out, _ = _bam(seed, tmp_path, kv, distinct=False)
    moe, info = load(out)
    assert_clean_load(info)
    assert type(moe).__name__ == "MoekitMoeForCausalLM" and moe.config.attention_experts == 3
    dense, _ = load(seed)
    ids = _ids(dense.config.vocab_size)
    assert torch.allclose(_logits(moe, ids), _logits(dense, ids), atol=1e-5)


@pytest.mark.parametrize("kv", ["shared", "expert"])
def test_plain_multi_head_attention_seed(kv, make_seed, tmp_path):
    seed = make_seed("llama", num_key_value_heads=4)  # MHA: as many KV heads as query heads
    out, _ = _bam(seed, tmp_path, kv, distinct=False)
    moe, dense = load(out)[0], load(seed)[0]
    ids = _ids(dense.config.vocab_size)
    assert torch.allclose(_logits(moe, ids), _logits(dense, ids), atol=1e-5)


def _reference_attention(moe, sources: list[Path], hidden: torch.Tensor, shared_kv: bool) -> torch.Tensor:
    """Layer 0's attention output as the routed mixture of each source's own dense attention module."""
    from transformers import AutoModelForCausalLM

    attention = moe.model.layers[0].self_attn
    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    rotary = moe.model.rotary_emb(hidden, positions)
    gates = torch.softmax(attention.router(hidden)[0].float(), dim=-1).reshape(*hidden.shape[:2], -1)
    total = torch.zeros_like(hidden)
    for expert, source in enumerate(sources):
        dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager")
        module = dense.model.layers[0].self_attn
        if shared_kv:  # the MoE's averaged key/value projections (and key norm) replace the source's own
            for name in ("k_proj", "v_proj", "k_norm"):
                if getattr(module, name, None) is not None:
                    getattr(module, name).load_state_dict(getattr(attention, name).state_dict())
        with torch.no_grad():
            out = module(hidden, position_embeddings=rotary, attention_mask=_causal(hidden.shape[1]))[0]
        total += gates[..., expert : expert + 1] * out
    return total


def _causal(length: int) -> torch.Tensor:
    mask = torch.full((length, length), float("-inf")).triu(1)
    return mask[None, None]


@pytest.mark.parametrize("kv", ["shared", "expert"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_distinct_experts_mix_each_branchs_own_attention(family, kv, make_seed, tmp_path):
    seed = make_seed(family)
    out, branches = _bam(seed, tmp_path, kv, distinct=True, router_std=0.1)
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    hidden = torch.randn(2, 12, moe.config.hidden_size, generator=torch.Generator().manual_seed(3))
    attention = moe.model.layers[0].self_attn
    rotary = moe.model.rotary_emb(hidden, torch.arange(12).unsqueeze(0))
    with torch.no_grad():
        got = attention(hidden, position_embeddings=rotary, attention_mask=_causal(12))[0]
    expected = _reference_attention(moe, [*branches.values(), seed], hidden, kv == "shared")
    assert not torch.allclose(got, _reference_attention(moe, [seed] * 3, hidden, kv == "shared"), atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize(("kv", "top_k"), [("shared", 0), ("expert", 0), ("expert", 2)])
def test_generation_with_the_kv_cache_equals_without(kv, top_k, make_seed, tmp_path):
    seed = make_seed("qwen3")
    out, _ = _bam(seed, tmp_path, kv, distinct=True, router_std=0.1, attention_top_k=top_k)
    moe = load(out)[0].eval()
    prompt = _ids(moe.config.vocab_size, seed=5, shape=(1, 6))
    cached = moe.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True, min_new_tokens=32)
    uncached = moe.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=False, min_new_tokens=32)
    assert cached.shape[1] == 38 and torch.equal(cached, uncached)


def test_bf16_tied_seed_and_plain_transformers_with_remote_code(make_seed, tmp_path):
    seed = make_seed("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    out, _ = _bam(seed, tmp_path, "expert", distinct=True)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moekit_moe.MoekitMoeForCausalLM"
    assert (out / "modeling_moekit_moe.py").is_file() and "lm_head.weight" not in Checkpoint(out).tensors
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    moe = load(out)[0]
    assert moe.dtype == torch.bfloat16 and moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = _ids(moe.config.vocab_size)
    torch.save({"ids": ids, "logits": _logits(moe.float(), ids)}, tmp_path / "ref.pt")
    # a fresh interpreter without moekit: transformers takes the modeling code from the output directory
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, "
        "output_loading_info=True, dtype=torch.float32)\n"
        "assert 'moekit' not in sys.modules and not any(info.values()), info\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "print(float((m(ref['ids']).logits - ref['logits']).abs().max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.fixture()
def bam_run(make_seed, tmp_path) -> Path:
    seed = make_seed("qwen3")
    out, _ = _bam(seed, tmp_path, "shared", distinct=True)
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 200))
    return out


def _data(root: Path) -> list[str]:
    return ["--data", f"code={root / 'code.txt'}", "--data", f"math={root / 'math.txt'}"]


def test_router_only_tune_trains_both_routers_and_reports_the_attention_router(bam_run, tmp_path):
    tuned = tmp_path / "tuned"
    result = cli("tune", bam_run, *_data(tmp_path), "--train", "router", "--max-steps", "3", "--out", tuned, *LOOP)
    assert result.exit_code == 0, result.output
    before, after = Checkpoint(bam_run), Checkpoint(tuned)
    changed = {n for n in before.tensors if not torch.equal(before.get(n), after.get(n))}
    assert changed and all(n.endswith(("mlp.gate.weight", "self_attn.router.weight")) for n in changed), changed
    assert any(n.endswith("self_attn.router.weight") for n in changed)
    assert all((tuned / name).is_file() for name in ("modeling_moekit_moe.py", "layers_moekit_moe.py"))  # its import
    rows = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "attn_maxvio" in r]
    assert len(trained) == 3 and all(r["attn_router_entropy"] > 0 for r in trained)
    result = cli("tune", bam_run, *_data(tmp_path), "--train", "router+attn", "--max-steps", "2", "--out",
                 tmp_path / "attn", *LOOP)  # fmt: skip
    assert result.exit_code == 0, result.output
    attn = Checkpoint(tmp_path / "attn")
    assert not torch.equal(attn.get("model.layers.0.self_attn.q_proj.weight"), before.get(
        "model.layers.0.self_attn.q_proj.weight"))  # fmt: skip
    assert torch.equal(attn.get("model.layers.0.mlp.experts.0.up_proj.weight"),
                       before.get("model.layers.0.mlp.experts.0.up_proj.weight"))  # fmt: skip


def test_inspect_eval_generate_and_compute(bam_run, tmp_path):
    plots = tmp_path / "plots"
    result = cli(
        "inspect", bam_run, *_data(tmp_path), "--seq-len", "32", "--json", tmp_path / "inspect.json", "--plot", plots
    )
    assert result.exit_code == 0, result.output
    assert "Attention experts" in result.output
    assert (plots / "attention_domains_mean.png").is_file() and (plots / "attention_gate_mass.png").is_file()
    attention = json.loads((tmp_path / "inspect.json").read_text())["routing"]["attention"]
    assert attention["soft"] and attention["expert_names"] == ["code", "math", "seed"]
    assert len(attention["layers"]) == 2 and set(attention["domain_matrix_mean"]) == {"code", "math"}
    assert abs(sum(attention["layers"][0]["gate_fraction"]) - 1) < 1e-4
    result = cli("eval", bam_run, *_data(tmp_path), "--seq-len", "32")
    assert result.exit_code == 0, result.output
    result = cli("generate", bam_run, "--prompt", "def f", "--max-new-tokens", "4", "--scmoe")
    assert result.exit_code == 0, result.output


def test_compute_counts_every_attention_expert(bam_run, make_seed):
    from moekit.train.compute import model_compute

    bam, seed = model_compute(bam_run), model_compute(make_seed("qwen3"))
    assert bam.attention_width == 3 * seed.attention_width
    config = Checkpoint(bam_run).config
    hidden, q_out = config["hidden_size"], config["num_attention_heads"] * config["head_dim"]
    extra_attention = config["num_hidden_layers"] * 2 * (2 * q_out * hidden)  # two more experts' q and o
    assert bam.active_params - seed.active_params >= extra_attention


def test_bad_inputs_are_refused_before_anything_is_written(make_seed, bam_run, tmp_path):
    phi3 = make_seed("phi3")
    run = branch(str(phi3), tmp_path / "phi3-run", ["code", "math"])
    cases = [
        (["mix", run.run_dir, "--attention-experts", "--out", tmp_path / "o1"], "attention experts"),
        (["mix", run.run_dir, "--attention-kv", "bogus", "--out", tmp_path / "o2"], "attention_kv"),
        (["mix", run.run_dir, "--target", "mixtral", "--attention-experts", "--out", tmp_path / "o3"], "moekit_moe"),
        (["mix", "--upcycle", phi3, "--attention-experts", "--out", tmp_path / "o4"], "branches"),
        (["mix", run.run_dir, "--attention-kv", "expert", "--out", tmp_path / "o5"], "attention_experts"),
        (
            ["mix", "--add-expert", f"law={run.branches['code']}", "--into", bam_run, "--out", tmp_path / "o6"],
            "attention experts",
        ),  # fmt: skip
    ]
    llama_run = branch(str(make_seed("llama")), tmp_path / "llama-run", ["code", "math"])
    cases.append(
        (["mix", llama_run.run_dir, "--attention-experts", "--attention-top-k", "4", "--out", tmp_path / "o7"], "top-k")
    )
    other_heads = make_seed("llama", num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # other attention
    seed = make_seed("llama")
    cases.append(
        (
            ["mix", "--expert", f"a={llama_run.branches['code']}", "--expert", f"b={other_heads}", "--seed-model",
             seed, "--attention-experts", "--out", tmp_path / "o8"],
            "differs from the seed",
        )
    )  # fmt: skip
    for args, words in cases:
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert words.lower() in result.output.lower().replace("\n", " "), (args, result.output)
        assert not Path(args[args.index("--out") + 1]).exists(), args
