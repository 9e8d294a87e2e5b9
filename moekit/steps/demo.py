"""``moekit demo``: the pipeline end to end on a tiny model built locally, in seconds on a CPU.

Builds a random tiny seed and generated data for two domains (code-like lines, arithmetic),
then runs the pipeline: ``branch`` into the two domains, ``train`` each branch briefly, ``mix``
them with a data-aware (centroid) router, ``tune`` the MoE with load balancing, plus the
sparse-upcycling baseline. It checks that outputs load in plain transformers, that an upcycled
MoE reproduces its seed exactly, and reports each model's held-out loss per domain.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.config import LoopSettings, MixConfig, TrainConfig, TuneConfig, UpcycleSettings
from moekit.data import packed_blocks, token_stream
from moekit.evaluation import domain_losses
from moekit.io.atomic import check_output_dir
from moekit.progress import quiet_transformers
from moekit.steps.branch import branch
from moekit.steps.mix import MixResult, mix
from moekit.steps.train import train
from moekit.steps.tune import tune
from moekit.tiny import build_tiny_model, domain_corpus

DOMAINS = ("code", "math")
SEQ_LEN = 64


@dataclass
class DemoResult:
    """Paths, checks and per-domain held-out losses from a demo run."""

    out: Path
    mixed: MixResult
    checks: dict[str, str] = field(default_factory=dict)
    losses: dict[str, dict[str, float]] = field(default_factory=dict)


def _loads_cleanly(model_dir: Path) -> tuple[bool, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    return not any(info.values()), model


def _max_logit_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    ids = torch.randint(0, a.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def _write_data(data: Path) -> dict[str, tuple[Path, Path]]:
    data.mkdir(parents=True)
    files = {}
    for domain in DOMAINS:
        train_file, heldout_file = data / f"{domain}.txt", data / f"{domain}-heldout.txt"
        train_file.write_text(domain_corpus(domain, 800, seed=0))
        heldout_file.write_text(domain_corpus(domain, 100, seed=1))
        files[domain] = (train_file, heldout_file)
    return files


def run_demo(out: Path, family: str = "llama", force: bool = False, show_progress: bool = True, steps: int = 80) -> DemoResult:
    """Build, branch, train, mix and upcycle a tiny model under ``out``; check and evaluate the results."""
    from transformers import AutoTokenizer

    quiet_transformers()  # moekit's own bars are enough for a demo
    out = Path(out).absolute()
    check_output_dir(out, force)
    if out.exists():
        shutil.rmtree(out)
    seed = build_tiny_model(out / "seed", family)
    files = _write_data(out / "data")
    run = branch(str(seed), out / "run", list(DOMAINS)).run_dir
    loop = LoopSettings(seq_len=SEQ_LEN, batch_size=8, max_steps=steps, lr=3e-3, eval_every=steps // 4, eval_blocks=8, save_every=0)
    train(TrainConfig(run_dir=run, data={d: [str(f[0])] for d, f in files.items()}, loop=loop), show_progress)
    mixed = mix(
        MixConfig(
            out=run / "mixed", seed=str(seed), experts=[(d, run / "branches" / d) for d in DOMAINS], run_dir=run,
            router="centroid", router_data={d: str(f[0]) for d, f in files.items()},
        ),
        show_progress=show_progress,
    )
    tune_loop = loop.model_copy(update={"max_steps": max(2, steps // 2), "lr": 1e-3})
    tuned = tune(TuneConfig(model=mixed.out, out=run / "tuned", run_dir=run, data={d: [str(f[0])] for d, f in files.items()}, loop=tune_loop), show_progress)
    upcycled = mix(MixConfig(out=out / "upcycled", seed=str(seed), upcycle=UpcycleSettings(num_experts=4)), show_progress=show_progress)
    checks = {}
    clean, _ = _loads_cleanly(mixed.out)
    checks["BTX mix loads in transformers, no missing/unexpected keys"] = "yes" if clean else "NO"
    clean, upcycled_model = _loads_cleanly(upcycled.out)
    _, seed_model = _loads_cleanly(seed)
    checks["upcycled MoE (4 equal experts) reproduces the seed"] = f"max |logit diff| {_max_logit_diff(upcycled_model, seed_model):.1e}"
    final = tuned.last_row
    checks["tune balanced the experts"] = f"MaxVio {final.get('maxvio', float('nan')):.2f}, dead experts {final.get('dead_experts')}"
    tokenizer = AutoTokenizer.from_pretrained(seed)
    heldout = {d: packed_blocks(token_stream(tokenizer, f[1]), SEQ_LEN, f[1]) for d, f in files.items()}
    models = {"seed": seed, **{f"branch {d}": run / "branches" / d for d in DOMAINS}, "BTX mix (untuned)": mixed.out, "BTX mix, tuned": tuned.out}
    losses = {name: domain_losses(path, heldout) for name, path in models.items()}
    return DemoResult(out, mixed, checks, losses)
