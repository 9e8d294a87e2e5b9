"""Benchmark ``moekit tune``'s step against a bare transformers loop with ``output_router_logits``.

Same MoE (a random Llama seed upcycled to 4 experts, top-2, built locally), same batch and
sequence length, AdamW, fp32 on CPU. Three measurements, interleaved over ``--repeats`` with the
best of each kept:

* bare: ``model(input_ids, labels, output_router_logits=True)``, whose loss already includes
  transformers' own load-balancing loss, then backward and an AdamW step;
* moekit tune: the shared training loop with moekit's routing hooks, Switch aux loss and
  per-step routing metrics;
* moekit without routing statistics (plain LM loss in the same loop), to isolate their cost.

Target: tune time per step / bare time per step <= 1.05.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build_moe(work: Path, hidden: int, layers: int) -> Path:
    """A random seed upcycled into a 4-expert top-2 Mixtral."""
    from moekit.config import MixConfig, UpcycleSettings
    from moekit.steps.mix import mix
    from moekit.tiny import build_tiny_model

    seed = build_tiny_model(
        work / "seed",
        "llama",
        init_std=0.02,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
    )
    return mix(
        MixConfig(out=work / "moe", seed=str(seed), upcycle=UpcycleSettings(num_experts=4, drop_fraction=0.5))
    ).out


def _per_step(stamps: list[float], skip: int) -> float:
    return (stamps[-1] - stamps[skip - 1]) / (len(stamps) - skip)


def bench_bare(moe: Path, blocks: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds per step of a bare loop with transformers' own router aux loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    model.config.router_aux_loss_coef = 0.01
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    stamps = []
    for step in range(args.steps):
        ids = blocks[(step * args.batch_size) % len(blocks) :][: args.batch_size].long()
        model(input_ids=ids, labels=ids, output_router_logits=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return _per_step(stamps, args.skip)


def bench_moekit(moe: Path, blocks: torch.Tensor, args: argparse.Namespace, work: Path, with_routing: bool) -> float:
    """Seconds per step of moekit's loop, with or without routing hooks, balance loss and metrics."""
    from transformers import AutoModelForCausalLM

    from moekit.config import LoopSettings
    from moekit.routing.control import RoutingController
    from moekit.routing.objective import BalancedObjective, BalanceSettings
    from moekit.train.loop import LoopJob, causal_lm_loss, make_loop_engine, run_loop

    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    settings = LoopSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        save_every=0,
        eval_every=0,
        precision="fp32",
    )
    stamps: list[float] = []
    job = LoopJob(
        model,
        blocks,
        {},
        settings,
        work / f"moekit-{with_routing}",
        show_progress=False,
        on_step_end=lambda s, r: stamps.append(time.perf_counter()),
        compute_loss=causal_lm_loss,
    )
    if with_routing:
        objective = BalancedObjective(RoutingController(model), BalanceSettings("switch", 0.01))
        job.compute_loss, job.step_metrics = objective, objective.step_metrics
    run_loop(job, make_loop_engine(settings))
    return _per_step(stamps, args.skip)


def main() -> None:
    """Run the three variants, print time per step and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps:
        parser.error("--skip must be at least 1 and less than --steps")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moekit.data import packed_blocks, token_stream
    from moekit.tiny import domain_corpus

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="moekit-bench-tune-") as tmp:
        work = Path(tmp)
        moe = build_moe(work, args.hidden, args.layers)
        (work / "data.txt").write_text("".join(domain_corpus(d, 4000, seed=1) for d in ("code", "math", "prose")))
        blocks = packed_blocks(
            token_stream(AutoTokenizer.from_pretrained(moe), work / "data.txt"), args.seq_len, "data"
        )
        runs: dict[str, list[float]] = {"bare": [], "tune": [], "plain": []}
        for _ in range(args.repeats):  # interleaved so drift in machine load hits every variant
            runs["bare"].append(bench_bare(moe, blocks, args))
            runs["tune"].append(bench_moekit(moe, blocks, args, work, with_routing=True))
            runs["plain"].append(bench_moekit(moe, blocks, args, work, with_routing=False))
        best = {k: min(v) for k, v in runs.items()}
        print(
            f"MoE: llama -> mixtral, 4 experts top-2, hidden {args.hidden}, {args.layers} layers; batch "
            f"{args.batch_size} x seq {args.seq_len}; fp32"
        )
        for name, label in (
            ("bare", "bare transformers loop (output_router_logits)"),
            ("tune", "moekit tune loop"),
            ("plain", "moekit loop, no routing stats/loss"),
        ):
            print(
                f"{label:48s} {best[name] * 1000:8.1f} ms/step (runs: "
                f"{', '.join(f'{r * 1000:.1f}' for r in runs[name])})"
            )
        print(f"ratio tune / bare: {best['tune'] / best['bare']:.3f}  (target <= 1.05)")
        print(f"routing statistics + balance loss overhead: {best['tune'] / best['plain'] - 1:+.1%} of a moekit step")


if __name__ == "__main__":
    main()
