"""BTX against its equal-compute baselines on the demo's domains, for several BTX variants ("levers").

Runs the demo recipe once in full (seed, branches, mix, tune, and the dense and upcycle
baselines), then each variant with the same seed, data and budgets, changing one lever. Every
variant spends the same tokens and model FLOPs as the default (FFN-only branches count their
full model FLOPs), so the default run's baselines are the baselines of every variant.
Prints held-out loss per domain and on average, and the margin of each tuned model over the
better baseline (negative: BTX wins).

    python bench/baselines.py --work /scratch/btx                      # default + every variant (~1.5 h on 2 cores)
    python bench/baselines.py --work /scratch/btx --variants ffn,ties  # a subset

With --recipe (e.g. recipes/seed-regime.yaml, minutes per run), every run, variants included,
builds its own baselines, and --repeats N runs each N times with other random seeds (data order,
router init), so each margin comes with its spread:

    python bench/baselines.py --recipe recipes/seed-regime.yaml --set seed.pretrain.max_steps=1600 --repeats 3
    --work /scratch/levers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "moekit" / "recipes" / "demo.yaml"
# name -> recipe overrides of the lever it changes
VARIANTS: dict[str, list[str]] = {
    "ffn": ["train.train=ffn"],  # branches train only their FFNs: mix averages nothing that diverged (FlexOlmo)
    "ffn-lr3e-3": ["train.train=ffn", "train.lr=3.0e-3"],  # FFN-only branches can take a larger step
    "ties": ["mix.merge=ties", "mix.merge_density=0.5"],  # shared tensors: seed + TIES-merged deltas
    "task-arithmetic-0.5": ["mix.merge=task-arithmetic", "mix.merge_scale=0.5"],  # halfway between seed and mean
    "tune-router+attn": ["tune.train=router+attn"],
    "tune-router": ["tune.train=router"],  # only the routers learn in tune (BTX's cheapest ablation)
    "tune-frozen-experts": ["tune.train=all-but-experts"],  # the paper's variant: experts keep their branch weights
    "low-lr": [
        "train.lr=3.0e-4",
        "tune.loop.lr=1.5e-4",
    ],  # gentler continued training of a converged seed (baselines get it too)
    "low-lr+tune-router": ["train.lr=3.0e-4", "tune.loop.lr=1.5e-4", "tune.train=router"],
    "tune-third": [
        "tune.loop.max_steps=20",
        "tune.loop.warmup_steps=2",
    ],  # a third of the tune (baselines matched to the smaller budget)
    "branches-2x": [
        "train.max_steps=120",
        "train.warmup_steps=12",
    ],  # twice the branch training: more drift, more specialisation
    "tune-lr1e-3": ["tune.loop.lr=1.0e-3"],
    # Branch-Attend-Mix: the branches' attention become attention experts (soft routing) instead of being averaged
    "bam-shared": ["mix.attention_experts=true", "mix.attention_kv=shared"],
    "bam-expert": ["mix.attention_experts=true", "mix.attention_kv=expert"],
    # HyperMoE: moekit's own family, then a tune of the routers and HyperMoE's modules (experts frozen)
    "hypermoe": ["mix.target=moekit_moe", "tune.hypermoe={}", "tune.train=hypermoe"],
}
VARIANT_STAGES = "stages=[branch, train, mix, tune, eval]"


def run(workdir: Path, overrides: list[str], demo: bool = False, recipe: Path = RECIPE) -> dict:
    """One recipe run (``moekit demo`` for the default; finished stages are skipped); its eval report and wall time."""
    started = time.perf_counter()
    moekit = [sys.executable, "-m", "moekit"]
    command = (
        [*moekit, "demo", "--out", str(workdir)]
        if demo
        else [*moekit, "run", str(recipe), f"workdir={workdir}", *overrides]
    )
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((workdir / "run" / "eval.json").read_text())
    return {"report": report, "seconds": time.perf_counter() - started}


def margin(report: dict) -> float:
    """Average held-out loss of BTX tuned minus the better equal-compute baseline (negative: BTX ahead)."""
    results = report["results"]
    return results["tuned"]["average"]["loss"] - min(results[b]["average"]["loss"] for b in ("dense", "upcycled"))


def repeat_overrides(repeat: int) -> list[str]:
    """Other random seeds for the branches' and tune's data order and the router initialisation (repeat 0: the
    recipe's)."""
    return [f"train.seed={repeat}", f"tune.loop.seed={repeat}", f"mix.random_seed={repeat}"] if repeat else []


def own_recipe(args: argparse.Namespace, chosen: list[str]) -> None:
    """Every variant (and the default) with its own baselines, ``--repeats`` times; mean and spread of each margin."""
    from statistics import mean

    names = ["default", *chosen]
    margins: dict[str, list[float]] = {n: [] for n in names}
    averages: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    seed = args.seed
    for repeat in range(args.repeats):
        for name in names:
            workdir = args.work / f"{name}-r{repeat}"
            overrides = [*args.set, *repeat_overrides(repeat), *([] if name == "default" else VARIANTS[name])]
            if seed is not None:  # one pretrained seed for every run
                overrides = [
                    f"seed={{path: {seed}}}",
                    "stages=[branch, train, mix, tune, dense, upcycle, eval]",
                    *overrides,
                ]
            result = run(workdir, overrides, recipe=args.recipe)
            seed = seed or workdir / "seed"
            margins[name].append(margin(result["report"]))
            for label, scores in result["report"]["results"].items():
                averages[name].setdefault(label, []).append(scores["average"]["loss"])
            print(
                f"{name} repeat {repeat}: margin {margins[name][-1]:+.3f} ({result['seconds'] / 60:.1f} min)",
                flush=True,
            )
    print(
        f"\n{'variant':<22}{'tuned':>9}{'dense':>9}{'upcycled':>10}{'mixed':>9}   tuned - best baseline (mean, "
        "min..max over repeats)"
    )
    for name in names:
        row = averages[name]
        print(
            f"{name:<22}"
            + "".join(
                f"{mean(row[k]):>{w}.3f}" for k, w in (("tuned", 9), ("dense", 9), ("upcycled", 10), ("mixed", 9))
            )
            + f"   {mean(margins[name]):+.3f} ({min(margins[name]):+.3f}..{max(margins[name]):+.3f})"
        )
    print(json.dumps({"margins": margins, "averages": averages}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, required=True, help="directory for the runs (kept: re-running skips finished stages)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--default", type=Path, default=None, help="a finished `moekit demo` work directory to use as the default run"
    )
    parser.add_argument(
        "--recipe", type=Path, default=None, help="another recipe (every run then builds its own baselines)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run (with --recipe)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per variant with other random seeds (with --recipe)"
    )
    parser.add_argument(
        "--seed", type=Path, default=None, help="an already pretrained seed for every run (with --recipe)"
    )
    args = parser.parse_args()
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.recipe is not None:
        own_recipe(args, chosen)
        return
    default = args.default or args.work / "default"
    base = run(default, [], demo=True)
    seed = f"seed={{path: {default / 'seed'}}}"
    results = {"default": base, **{v: run(args.work / v, [seed, VARIANT_STAGES, *VARIANTS[v]]) for v in chosen}}
    report = base["report"]
    domains = [*report["domains"], "average"]
    rows = [
        ("seed", report["results"]["seed"]),
        ("dense (data-matched)", report["results"]["dense"]),
        ("upcycled (FLOP-matched)", report["results"]["upcycled"]),
    ]
    for name, result in results.items():
        rows += [
            (f"{name}: mixed", result["report"]["results"]["mixed"]),
            (f"{name}: tuned", result["report"]["results"]["tuned"]),
        ]
    print(f"{'model':<32}" + "".join(f"{d:>10}" for d in domains))
    for label, scores in rows:
        print(f"{label:<32}" + "".join(f"{scores[d]['loss']:>10.3f}" for d in domains))
    compute = report.get("compute", {})
    print(
        f"\ncompute (beyond the seed): tuned {compute.get('tuned')}, dense {compute.get('dense')}, upcycled "
        f"{compute.get('upcycled')}"
    )
    for name, result in results.items():
        ahead = result["report"]["results"]["tuned"]["average"]["loss"] - min(
            report["results"][b]["average"]["loss"] for b in ("dense", "upcycled")
        )
        print(
            f"{name:<22} tuned - best baseline (average loss): {ahead:+.3f} "
            f"({'BTX ahead' if ahead < 0 else 'baseline ahead'}); "
            f"run {result['seconds'] / 60:.1f} min"
        )
    print(
        json.dumps(
            {name: {k: v["average"]["loss"] for k, v in r["report"]["results"].items()} for name, r in results.items()}
        )
    )


if __name__ == "__main__":
    main()
