"""``moekit demo``: the pipeline end to end on a tiny model built locally, in seconds on a CPU.

What it shows today: a seed built from scratch, ``branch`` into two domains, ``mix`` with a
data-aware (centroid) router, a check that the MoE loads in plain transformers and equals the
seed (its branches are still untrained copies, so it must), and the upcycling baseline. Branch
training and router tuning join the demo when ``train`` and ``tune`` land.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.config import MixConfig, UpcycleSettings
from moekit.io.atomic import check_output_dir
from moekit.steps.branch import branch
from moekit.steps.mix import MixResult, mix
from moekit.tiny import build_tiny_model, domain_corpus

DOMAINS = ("code", "math")


@dataclass
class DemoResult:
    """Paths and checks from a demo run."""

    out: Path
    mixed: MixResult
    upcycled: MixResult
    checks: dict[str, str] = field(default_factory=dict)


def verify_against_seed(moe_dir: Path, seed_dir: Path) -> tuple[dict[str, list], float]:
    """Load an MoE and its seed; return the loading info and the max |logit difference|."""
    from transformers import AutoModelForCausalLM

    moe, info = AutoModelForCausalLM.from_pretrained(moe_dir, output_loading_info=True)
    dense = AutoModelForCausalLM.from_pretrained(seed_dir)
    ids = torch.randint(0, dense.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    return {k: list(v) for k, v in info.items()}, diff


def run_demo(out: Path, family: str = "llama", force: bool = False, show_progress: bool = True) -> DemoResult:
    """Build a tiny seed, branch it, mix it (centroid router), verify, and upcycle it under ``out``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars are enough for a demo
    out = Path(out).absolute()
    check_output_dir(out, force)
    if out.exists() and force:
        import shutil

        shutil.rmtree(out)
    seed = build_tiny_model(out / "seed", family)
    data = out / "data"
    data.mkdir(parents=True)
    for domain in DOMAINS:
        (data / f"{domain}.txt").write_text(domain_corpus(domain, 300))
    run = branch(str(seed), out / "run", list(DOMAINS)).run_dir
    mixed = mix(
        MixConfig(
            out=run / "mixed", seed=str(seed), experts=[(d, run / "branches" / d) for d in DOMAINS], run_dir=run,
            router="centroid", router_data={d: str(data / f"{d}.txt") for d in DOMAINS},
        ),
        show_progress=show_progress,
    )
    info, diff = verify_against_seed(mixed.out, seed)
    checks = {
        "mixed loads with no missing/unexpected keys": "yes" if not any(info.values()) else f"NO: {info}",
        "mixed logits equal the seed's (untrained branches)": f"max |diff| = {diff:.2e}",
    }
    upcycled = mix(
        MixConfig(out=out / "upcycled", seed=str(seed), upcycle=UpcycleSettings(num_experts=4, drop_fraction=0.5)),
        show_progress=show_progress,
    )
    info, _ = verify_against_seed(upcycled.out, seed)
    checks["upcycled (4 experts, drop 0.5) loads cleanly"] = "yes" if not any(info.values()) else f"NO: {info}"
    return DemoResult(out, mixed, upcycled, checks)
