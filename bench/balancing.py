"""Measure load-balancing methods and the seed expert's role at small scale, same budget for each.

Not a speed benchmark: a quality table for docs/commands/tune.md. One BTX run on the demo's
three domains (Python stdlib code, pydoc English text, generated arithmetic) builds the inputs:
a small Llama seed pretrained here, three branches trained on their domains. Then, from the same
branches and the same centroid router:

* a GLM-4.5-layout MoE (``mix --target glm4_moe``, seed as a routed expert, 4 experts top-2) is
  tuned four times with the same steps, data, learning rate and random seed: no balancing, the
  Switch aux loss, loss-free bias balancing (DeepSeek-V3's sign rule), and bias plus a small
  sequence-wise aux loss;
* the seed as a routed expert versus as the always-on shared expert (``--seed-as shared``,
  3 routed experts top-2 plus the shared one), both tuned with the Switch aux loss;
* the routing variants on the same routed MoE: S-BASE (``--routing sbase``, no loss), the
  Switch aux loss with router jitter (``--router-jitter 0.01``), and group-limited routing
  (``mix --groups 2 --topk-groups 1``: the 4 experts as 2 groups of 2, one group per token) with
  loss-free bias balancing.

Each row reports the held-out loss per domain after tuning (on the recorded held-out split of
each domain) and the held-out MaxVio of the final evaluation (max over experts of
load / mean load - 1, mean over layers; 0 is perfect balance), from the tune result itself, and
the mean wall time of a tune step (the whole tune call over its steps, evaluations included).

    .venv/bin/python bench/balancing.py [--work DIR] [--tune-steps 80] [--bias-rate 0.01]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DOMAINS = {"code": "builtin:python-stdlib", "prose": "builtin:pydoc-topics", "math": "builtin:arithmetic"}


def build_branches(work: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, list[str]]]:
    """Seed, branches and trained branches via a recipe; returns the run directory, the seed and each domain's data
    files."""
    from moekit.recipe import Recipe
    from moekit.steps.run import RecipeRun, run_recipe

    loop = dict(
        seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=10, eval_every=0, eval_blocks=8, save_every=0
    )
    recipe = Recipe.model_validate(
        dict(
            name="bench-balancing",
            workdir=work,
            seed=dict(
                build="pretrained-small", size="small", pretrain=dict(loop, max_steps=args.pretrain_steps, lr=3e-3)
            ),
            domains={d: {"data": [spec]} for d, spec in DOMAINS.items()},
            train=dict(loop, max_steps=args.train_steps, lr=1e-3),
            stages=["seed", "branch", "train"],
        )
    )
    run_recipe(recipe, show_progress=False, log=print)
    runner = RecipeRun(recipe, False, lambda message: None)
    return runner.run_dir, runner.seed_dir(), runner.data


def mix_variant(run_dir: Path, seed: Path, data: dict[str, list[str]], seed_as: str, out: Path, **options: int) -> Path:
    """A GLM-4.5-layout MoE from the trained branches, with the centroid router (``options``: e.g. groups)."""
    from moekit.config import MixConfig
    from moekit.steps.mix import mix

    cfg = MixConfig(
        out=out,
        seed=str(seed),
        experts=[(d, run_dir / "branches" / d) for d in DOMAINS],
        target="glm4_moe",
        seed_as=seed_as,
        top_k=2,
        router="centroid",
        router_data={d: specs[0] for d, specs in data.items()},
        router_tokens=4096,
        force=True,
        **options,
    )
    return mix(cfg, show_progress=False).out


def tune_variant(moe: Path, data: dict[str, list[str]], out: Path, args: argparse.Namespace, **balance) -> dict:
    """Tune ``moe`` with one balancing setting; held-out loss per domain and held-out MaxVio."""
    from moekit.config import LoopSettings, TuneConfig
    from moekit.steps.tune import tune

    loop = LoopSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.tune_steps,
        lr=5e-4,
        warmup_steps=10,
        eval_every=0,
        eval_blocks=16,
        save_every=0,
    )
    started = time.perf_counter()
    result = tune(
        TuneConfig(model=moe, out=out, data=data, train="all", loop=loop, force=True, **balance), show_progress=False
    )
    heldout = result.heldout_routing
    return {
        "eval": {d: result.eval.get(f"eval/{d}/loss", result.eval.get(d)) for d in DOMAINS},
        "maxvio": heldout.get("maxvio_mean"),
        "maxvio_max": heldout.get("maxvio_max"),
        "dead": heldout.get("dead_experts"),
        "seconds": time.perf_counter() - started,
        "step_seconds": (time.perf_counter() - started) / args.tune_steps,
    }


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of the shared setup: working directory, block shape and the seed / branch / tune budgets."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--train-steps", type=int, default=50)
    parser.add_argument("--tune-steps", type=int, default=80)
    return parser


def main() -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bias-rate", type=float, default=0.01, help="u of the sign rule (larger than DeepSeek-V3's 1e-3: few steps)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        run_dir, seed, data = build_branches(work, args)
        routed = mix_variant(run_dir, seed, data, "routed", work / "moe-routed")
        shared = mix_variant(run_dir, seed, data, "shared", work / "moe-shared")
        grouped = mix_variant(run_dir, seed, data, "routed", work / "moe-grouped", groups=2, topk_groups=1)
        rows = {
            "no balancing": tune_variant(routed, data, work / "t-none", args, balance="none"),
            "aux loss (switch, 0.01)": tune_variant(
                routed, data, work / "t-aux", args, balance="switch", aux_coef=0.01
            ),
            f"bias (sign, u={args.bias_rate:g})": tune_variant(
                routed, data, work / "t-bias", args, balance="bias", bias_rate=args.bias_rate
            ),
            "bias + sequence aux (1e-3)": tune_variant(
                routed, data, work / "t-both", args, balance="bias", bias_rate=args.bias_rate, aux_coef=1e-3
            ),
            "seed as shared expert, aux loss": tune_variant(
                shared, data, work / "t-shared", args, balance="switch", aux_coef=0.01
            ),
            "S-BASE (sinkhorn-balanced top-k, no loss)": tune_variant(
                routed, data, work / "t-sbase", args, routing="sbase"
            ),
            "aux loss + router jitter 0.01": tune_variant(
                routed, data, work / "t-jitter", args, balance="switch", aux_coef=0.01, router_jitter=0.01
            ),
            f"2 groups, 1 per token, bias (u={args.bias_rate:g})": tune_variant(
                grouped, data, work / "t-groups", args, balance="bias", bias_rate=args.bias_rate
            ),
        }
    print(
        f"\n{args.tune_steps} tune steps x {args.batch_size} x {args.seq_len} tokens each, glm4_moe target, "
        "centroid router, train all"
    )
    print(
        "| variant | "
        + " | ".join(f"held-out loss {d}" for d in DOMAINS)
        + " | held-out MaxVio (mean / max layer) | dead experts | s / step |"
    )
    print("|---|" + "---|" * (len(DOMAINS) + 3))
    for name, row in rows.items():
        losses = " | ".join(f"{row['eval'][d]:.3f}" if row["eval"][d] is not None else "n/a" for d in DOMAINS)
        print(
            f"| {name} | {losses} | {row['maxvio']:.3f} / {row['maxvio_max']:.3f} | {row['dead']} | "
            f"{row['step_seconds']:.3f} |"
        )
    print(
        "(rows 1-4 and 6-8: seed as a routed expert, 4 experts top-2; row 5: 3 routed experts top-2 plus the seed "
        "always on; row 8: the 4 experts as 2 groups of 2, top-2 within one group)"
    )


if __name__ == "__main__":
    main()
