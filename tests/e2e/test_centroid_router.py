"""Centroid router init sends each domain's tokens to its own expert from the start."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moekit.config import MixConfig
from moekit.data import load_token_blocks
from moekit.manifest import load_manifest
from moekit.routing.init import mean_top1_probability
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import domain_corpus
from tests.conftest import assert_clean_load, load

DOMAINS = ("code", "math", "prose")


def _train_branch(path: Path, blocks: torch.Tensor, steps: int = 25) -> None:
    """A few plain AdamW steps on one domain, then save without touching shared files."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = blocks[(step * 4) % len(blocks) :][:4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    for file in path.glob("model*.safetensors"):
        file.unlink()  # the seed's hard links keep the old content
    model.save_pretrained(path)


def test_centroid_routes_domains_to_their_experts(make_seed, tmp_path):
    seed = make_seed("llama")
    tokenizer = AutoTokenizer.from_pretrained(seed)
    data = {}
    for domain in DOMAINS:
        data[domain] = tmp_path / f"{domain}.txt"
        data[domain].write_text(domain_corpus(domain, 300, seed=0))
    run = branch(str(seed), tmp_path / "run", list(DOMAINS))
    for domain, path in run.branches.items():
        _train_branch(path, load_token_blocks(tokenizer, data[domain], 64))
    result = mix(
        MixConfig(
            out=tmp_path / "run" / "mixed",
            seed=str(seed),
            experts=list(run.branches.items()),
            run_dir=run.run_dir,
            router="centroid",
            router_data={d: str(p) for d, p in data.items()},
            router_tokens=4096,
        )
    )
    moe, info = load(result.out)
    assert_clean_load(info)
    experts = result.experts
    assert experts == [*DOMAINS, "seed"]
    for domain in DOMAINS:  # held-out text, generated with another seed
        held_out = tmp_path / f"{domain}-eval.txt"
        held_out.write_text(domain_corpus(domain, 100, seed=1))
        ids = load_token_blocks(tokenizer, held_out, 64)[:8]
        with torch.no_grad():
            router_logits = moe(input_ids=ids, output_router_logits=True).router_logits
        for layer_logits in router_logits:
            share = (layer_logits.argmax(-1) == experts.index(domain)).float().mean()
            assert share > 0.5, (domain, float(share))
            top1 = mean_top1_probability(layer_logits)
            assert 1 / len(experts) + 0.05 < top1 < 0.99  # neither uniform nor saturated
    assert load_manifest(run.run_dir).stages[-1].stage == "mix"
    assert min(result.router_stats["init_in_domain_top1"].values()) > 0.5
