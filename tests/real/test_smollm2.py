"""The whole BTX pipeline on a real pretrained model: SmolLM2-135M-Instruct (bf16, tied, 3 shards).

branch -> (identical mix: greedy text equals the seed's) -> train -> mix (centroid router) ->
tune -> eval -> inspect -> a third domain added (branch --add, train, mix --add-expert, router
tune) -> eval -> report, through the real CLI, with every output checked for loading info,
dtypes, the tie and the parameter count. Budgets are tiny (2 steps of 32-token blocks): the
point is the checkpoint path on real weights, not the learning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.builtin_data import materialize
from moekit.cli import build_app
from moekit.io.checkpoint import Checkpoint
from tests.assets import smollm2_checkpoint
from tests.conftest import assert_added_expert_is_the_branch
from tests.formats import assert_portable_checkpoint

LOOP = [
    "--seq-len",
    "32",
    "--batch-size",
    "1",
    "--max-steps",
    "2",
    "--eval-every",
    "0",
    "--eval-blocks",
    "2",
    "--save-every",
    "0",
]


def cli(*args):
    result = CliRunner().invoke(build_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def seed() -> Path:
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small real text: Python standard library code and pydoc's English reference text."""
    root = tmp_path_factory.mktemp("data")
    files = {}
    for domain, name in (("code", "python-stdlib"), ("prose", "pydoc-topics"), ("math", "arithmetic")):
        source = materialize(name, root / "builtin")
        files[domain] = root / f"{domain}.txt"
        with open(source, encoding="utf-8") as handle:
            records = 3 if domain != "math" else 2000  # arithmetic records are one line each
            text = "\n".join(json.loads(next(handle))["text"] for _ in range(records))
        files[domain].write_text(text[:20000], encoding="utf-8")
    return files


def _greedy(model_dir: Path, tokenizer_dir: Path, new_tokens: int = 12) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_btx_pipeline_on_smollm2(seed, data, tmp_path):
    run = tmp_path / "run"
    cli("branch", seed, run, "--domain", "code", "--domain", "prose")
    seed_params = sum(math.prod(t.shape) for t in Checkpoint(seed).tensors.values())
    config = json.loads((seed / "config.json").read_text())
    layers, hidden, ffn = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]

    # identical branches: the MoE is the seed, down to greedy text
    cli("mix", run, "--out", tmp_path / "identical")
    assert_portable_checkpoint(tmp_path / "identical", torch.bfloat16, tied=True, reference_tokenizer=seed)
    assert _greedy(tmp_path / "identical", seed) == _greedy(seed, seed)

    data_args = [a for d, p in data.items() if d != "math" for a in ("--data", f"{d}={p}")]
    cli("train", run, *data_args, *LOOP, "--lr", "1e-3")
    for name in ("code", "prose"):
        assert_portable_checkpoint(run / "branches" / name, torch.bfloat16, tied=True, reference_tokenizer=seed)
        assert set(Checkpoint(run / "branches" / name).tensors) == set(Checkpoint(seed).tensors)

    router_data = [a for d, p in data.items() if d != "math" for a in ("--router-data", f"{d}={p}")]
    cli("mix", run, "--router", "centroid", *router_data, "--router-tokens", "256", "--router-seq-len", "32")
    assert_portable_checkpoint(run / "mixed", torch.bfloat16, tied=True, reference_tokenizer=seed)

    cli("tune", run, *LOOP)
    tuned = run / "tuned"
    assert_portable_checkpoint(tuned, torch.bfloat16, tied=True, reference_tokenizer=seed)

    report = tmp_path / "inspect.json"
    cli("inspect", tuned, *data_args, "--seq-len", "32", "--max-tokens", "128", "--json", report)
    static = json.loads(report.read_text())["static"]
    experts = 3  # code, prose and the seed's own FFN
    assert static["total_params"] == seed_params + (experts - 1) * layers * 3 * hidden * ffn + layers * experts * hidden
    assert static["active_params"] == static["total_params"] - (experts - 2) * layers * 3 * hidden * ffn
    assert all(0.9 < layer["mean_expert_cosine"] < 1.0 for layer in static["per_layer"])  # trained, not copies

    evaluation = tmp_path / "eval.json"
    cli("eval", run, "--seq-len", "32", "--max-tokens", "64", "--json", evaluation)
    results = json.loads(evaluation.read_text())["results"]
    assert {"seed", "branch code", "branch prose", "mixed", "tuned"} <= set(results)
    assert all(math.isfinite(scores["average"]["loss"]) for scores in results.values())

    # grow the tuned MoE by a third domain: every old tensor byte for byte, still a portable checkpoint
    cli("branch", seed, run, "--domain", "math", "--add")
    cli("train", run, "--branch", "math", "--data", f"math={data['math']}", *LOOP, "--lr", "1e-3")
    cli("mix", run, "--add-expert", "math", "--router-tokens", "256", "--router-seq-len", "32")
    grown = run / "grown"
    assert_portable_checkpoint(grown, torch.bfloat16, tied=True, reference_tokenizer=seed)
    old, new = Checkpoint(tuned), Checkpoint(grown)
    for name, info in old.tensors.items():
        stored = new.tensors[name]
        if stored.shape == info.shape:
            assert (
                new.array_rows(name, 0, info.shape[0]).tobytes() == old.array_rows(name, 0, info.shape[0]).tobytes()
            ), name
        else:
            assert stored.shape == (info.shape[0] + 1, *info.shape[1:]), name
    assert json.loads((grown / "config.json").read_text())["num_local_experts"] == experts + 1
    assert_added_expert_is_the_branch(grown, run / "branches" / "math")
    cli("tune", grown, "--train", "router", *LOOP)
    cli("eval", run, "--seq-len", "32", "--max-tokens", "64")
    recorded = json.loads((run / "eval.json").read_text())
    assert recorded["domains"] == ["code", "prose", "math"] and {"grown", "grown-tuned"} <= set(recorded["results"])
    cli("report", run, "--max-new-tokens", "4")
    page = (run / "report.html").read_text()
    assert all(
        f'<section id="{s}">' in page for s in ("stages", "curves", "evaluation", "routing", "tokens", "generations")
    )


@pytest.mark.parametrize("kv", ["shared", "expert"])
def test_attention_experts_on_smollm2(kv, seed, tmp_path):
    """BAM on the real bf16, tied, GQA seed: identical branches give the seed's logits (fp32 to 1e-4; bf16 to one
    rounding step of the largest logit: the experts' outputs are summed in fp32 and rounded once) and its greedy
    text, with the KV cache and without."""
    run = tmp_path / "run"
    cli("branch", seed, run, "--domain", "code", "--domain", "prose")
    out = tmp_path / f"bam-{kv}"
    cli("mix", run, "--attention-experts", "--attention-kv", kv, "--out", out)
    assert_portable_checkpoint(out, torch.bfloat16, tied=True, reference_tokenizer=seed)
    tokenizer = AutoTokenizer.from_pretrained(seed)
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt")["input_ids"]
    for dtype in (torch.float32, torch.bfloat16):
        moe = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
        dense = AutoModelForCausalLM.from_pretrained(seed, dtype=dtype).eval()
        with torch.no_grad():
            got, expected = moe(ids).logits.float(), dense(ids).logits.float()
        ulp = 2.0 ** (math.floor(math.log2(float(expected.abs().max()))) - 7)  # bf16: 8 significant bits
        tolerance = 1e-4 if dtype == torch.float32 else ulp
        assert (got - expected).abs().max() <= tolerance, (dtype, (got - expected).abs().max())
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert _greedy(out, seed, new_tokens=32) == _greedy(seed, seed, new_tokens=32)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    uncached = moe.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(moe.generate(ids, max_new_tokens=16, do_sample=False), uncached)
