"""BTX against its equal-compute baselines on the demo's domains, for several BTX variants ("levers").

Runs the demo recipe once in full (seed, branches, mix, tune, and the dense and upcycle
baselines), then each variant with the same seed, data and budgets, changing one lever. Every
variant spends the same tokens and model FLOPs as the default (FFN-only branches count their
full model FLOPs), so the default run's baselines are the baselines of every variant.
Prints held-out loss per domain and on average, and the margin of each tuned model over the
better baseline (negative: BTX wins).

    python bench/baselines.py --work /scratch/btx                      # default + every variant (~1.5 h on 2 cores)
    python bench/baselines.py --work /scratch/btx --variants ffn,ties  # a subset
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
    "tune-lr1e-3": ["tune.loop.lr=1.0e-3"],
}
VARIANT_STAGES = "stages=[branch, train, mix, tune, eval]"


def run(workdir: Path, overrides: list[str], demo: bool = False) -> dict:
    """One recipe run (``moekit demo`` for the default; finished stages are skipped); its eval report and wall time."""
    started = time.perf_counter()
    moekit = [sys.executable, "-m", "moekit"]
    command = [*moekit, "demo", "--out", str(workdir)] if demo else [*moekit, "run", str(RECIPE), f"workdir={workdir}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((workdir / "run" / "eval.json").read_text())
    return {"report": report, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="directory for the runs (kept: re-running skips finished stages)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--default", type=Path, default=None, help="a finished `moekit demo` work directory to use as the default run")
    args = parser.parse_args()
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    default = args.default or args.work / "default"
    base = run(default, [], demo=True)
    seed = f"seed={{path: {default / 'seed'}}}"
    results = {"default": base, **{v: run(args.work / v, [seed, VARIANT_STAGES, *VARIANTS[v]]) for v in chosen}}
    report = base["report"]
    domains = [*report["domains"], "average"]
    rows = [("seed", report["results"]["seed"]), ("dense (data-matched)", report["results"]["dense"]),
            ("upcycled (FLOP-matched)", report["results"]["upcycled"])]
    for name, result in results.items():
        rows += [(f"{name}: mixed", result["report"]["results"]["mixed"]), (f"{name}: tuned", result["report"]["results"]["tuned"])]
    print(f"{'model':<32}" + "".join(f"{d:>10}" for d in domains))
    for label, scores in rows:
        print(f"{label:<32}" + "".join(f"{scores[d]['loss']:>10.3f}" for d in domains))
    best_baseline = min(report["results"][b]["average"]["loss"] for b in ("dense", "upcycled"))
    compute = report.get("compute", {})
    print(f"\ncompute (beyond the seed): tuned {compute.get('tuned')}, dense {compute.get('dense')}, upcycled {compute.get('upcycled')}")
    for name, result in results.items():
        margin = result["report"]["results"]["tuned"]["average"]["loss"] - best_baseline
        print(f"{name:<22} tuned - best baseline (average loss): {margin:+.3f} ({'BTX ahead' if margin < 0 else 'baseline ahead'}); "
              f"run {result['seconds'] / 60:.1f} min")
    print(json.dumps({name: {k: v["average"]["loss"] for k, v in r["report"]["results"].items()} for name, r in results.items()}))


if __name__ == "__main__":
    main()
