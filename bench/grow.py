"""Growing a built MoE by one expert (``mix --add-expert``): what the new domain gains, what the old ones lose.

Runs recipes/seed-regime.yaml with two domains (code, math; the seed is pretrained on those two
only), so the run ends with a tuned 3-expert MoE (code, math, seed). Then, as a user would, with
the CLI: a prose branch is added to the run (``branch --add``) and trained like the others, the
tuned MoE is grown by its FFN (``mix RUN --add-expert prose``), the grown MoE's router is tuned
(``tune RUN/grown --train router``: router weights only, on the run's three domains), and
``eval RUN`` compares every model on the recorded held-out data. Prints per domain the tuned
(old) MoE's loss, the grown MoE's before and after the router tune, and the relative changes.

    python bench/grow.py --work /scratch/grow                      # about 10 minutes on 2 cores
    python bench/grow.py --work /scratch/grow --router-steps 60 --router-data new   # tune on prose only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "seed-regime.yaml"


def moekit(*args: str) -> None:
    """Run one moekit command as a process (what a user waits for), quiet unless it fails."""
    done = subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"moekit {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def two_domain_recipe(work: Path, seed_steps: int) -> Path:
    """seed-regime.yaml without the prose domain and the baselines."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["workdir"] = str(work)
    recipe["domains"].pop("prose")
    recipe["seed"]["pretrain"].update(max_steps=seed_steps, eval_every=seed_steps, save_every=seed_steps)
    recipe["stages"] = ["seed", "branch", "train", "mix", "tune"]
    path = work / "grow.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed-steps", type=int, default=400)
    parser.add_argument("--router-steps", type=int, default=40)
    parser.add_argument("--router-lr", type=float, default=2e-3)
    parser.add_argument(
        "--train",
        choices=("router", "new-expert+router"),
        default="router",
        help="what the tune of the grown MoE trains",
    )
    parser.add_argument(
        "--router-data",
        choices=("all", "new"),
        default="all",
        help="router tune data: the run's three domains, or prose only",
    )
    args = parser.parse_args()
    from moekit.builtin_data import materialize

    started = time.perf_counter()
    recipe = two_domain_recipe(args.work, args.seed_steps)
    moekit("run", str(recipe))
    run = args.work / "run"
    prose = materialize("builtin:pydoc-topics", args.work / "data")
    loop = [
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "6",
        "--eval-every",
        "30",
        "--eval-blocks",
        "8",
    ]
    if not (run / "branches" / "prose" / "metrics.jsonl").is_file():  # a re-run keeps the trained prose branch
        if not (run / "branches" / "prose").is_dir():
            moekit("branch", str(args.work / "seed"), str(run), "--domain", "prose", "--add")
        moekit(
            "train",
            str(run),
            "--branch",
            "prose",
            "--data",
            f"prose={prose}",
            "--max-steps",
            "60",
            "--save-every",
            "30",
            *loop,
        )
    moekit("mix", str(run), "--add-expert", "prose", "--router-tokens", "4096", "--force")
    data = ["--data", f"prose={prose}"] if args.router_data == "new" else []
    tune_loop = [
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--lr",
        str(args.router_lr),
        "--warmup-steps",
        "4",
        "--eval-every",
        str(args.router_steps),
        "--eval-blocks",
        "8",
        "--save-every",
        str(args.router_steps),
    ]
    moekit(
        "tune",
        str(run / "grown"),
        "--train",
        args.train,
        "--max-steps",
        str(args.router_steps),
        "--force",
        *data,
        *tune_loop,
    )
    moekit("eval", str(run), "--max-tokens", "16384", "--batch-size", "16", "--json", str(args.work / "eval.json"))
    report = json.loads((args.work / "eval.json").read_text())
    results = report["results"]
    grown = yaml.safe_load((run / "grown" / "moekit.yaml").read_text())["router"]
    print(
        f"router init: {grown['init_new_domain_top_k']:.0%} of prose tokens, "
        f"{grown['init_old_domains_top_k']:.0%} of code/math tokens "
        "have the new expert in their top-k"
    )
    print(f"{'domain':8} {'tuned (old)':>12} {'grown':>9} {'grown-tuned':>12} {'change':>8}")
    for domain in report["domains"]:
        old, new, tuned = (results[m][domain]["loss"] for m in ("tuned", "grown", "grown-tuned"))
        print(f"{domain:8} {old:12.4f} {new:9.4f} {tuned:12.4f} {100 * (tuned - old) / old:+7.2f}%")
    print(
        f"(--train {args.train} on {'the three domains' if args.router_data == 'all' else 'prose only'}, "
        f"{args.router_steps} steps at lr {args.router_lr}; "
        f"wall {time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
