"""Where BTX overtakes its equal-compute baselines as the seed is pretrained longer.

Runs recipes/seed-regime.yaml (a tiny seed pretrained here on the demo's domains; BTX, the
data-matched dense baseline and the FLOP-matched upcycling baseline with the same budgets) once
per seed pretraining length, and prints the average held-out loss of each, and BTX tuned minus
the better baseline (negative: BTX ahead). With --plot, draws the curve.

    python bench/seed_regime.py --work /scratch/regime --steps 100,400,1600,6400 --plot docs/img/seed-regime.png
    python bench/seed_regime.py --work /scratch/regime --steps 400 train.train=ffn   # extra recipe overrides
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "seed-regime.yaml"
ROWS = ("seed", "mixed", "tuned", "dense", "upcycled")


def run_point(workdir: Path, steps: int, overrides: list[str]) -> dict:
    """One recipe run with the seed pretrained ``steps`` steps; its average losses and wall time."""
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "moekit",
        "run",
        str(RECIPE),
        f"workdir={workdir}",
        f"seed.pretrain.max_steps={steps}",
        f"seed.pretrain.warmup_steps={max(1, steps // 20)}",
        f"seed.pretrain.eval_every={steps}",
        f"seed.pretrain.save_every={steps}",
        *overrides,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((workdir / "run" / "eval.json").read_text())
    losses = {row: report["results"][row]["average"]["loss"] for row in ROWS if row in report["results"]}
    return {
        "steps": steps,
        "losses": losses,
        "compute": report.get("compute", {}),
        "seconds": time.perf_counter() - started,
    }


def plot(points: list[dict], path: Path) -> None:
    """Left: average held-out loss against seed pretraining tokens. Right: each model minus the dense baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "tuned": "BTX tuned",
        "dense": "dense (data-matched)",
        "upcycled": "upcycled (FLOP-matched)",
        "mixed": "BTX mixed, before tune",
    }
    styles = dict(zip(ROWS, ("k:", "C7--", "C0-o", "C1-s", "C2-^")))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    for row in ROWS:
        shown = [p for p in points if row in p["losses"]]
        xs = [p["tokens"] for p in shown]
        left.plot(xs, [p["losses"][row] for p in shown], styles[row], label=labels.get(row, row))
        right.plot(
            xs, [p["losses"][row] - p["losses"]["dense"] for p in shown], styles[row], label=labels.get(row, row)
        )
    right.axhline(0.0, color="C1", linewidth=0.8)
    for ax, ylabel, title in (
        (left, "average held-out loss (3 domains)", "held-out loss"),
        (right, "loss minus the dense baseline's", "against the dense baseline (below 0: better)"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("seed pretraining tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle("BTX vs its equal-compute baselines as the seed trains longer (recipes/seed-regime.yaml)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, required=True, help="directory for the runs (kept: re-running skips finished stages)"
    )
    parser.add_argument(
        "--steps", default="100,400,1600,6400", help="seed pretraining lengths in steps, comma-separated"
    )
    parser.add_argument("--plot", type=Path, default=None, help="write the curve to this PNG")
    parser.add_argument(
        "--points", type=Path, default=None, help="redraw from a points.json an earlier run wrote (nothing is run)"
    )
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. train.train=ffn")
    args = parser.parse_args()
    if args.points is not None:
        plot(json.loads(args.points.read_text()), args.plot or args.points.with_suffix(".png"))
        return
    import yaml

    pretrain = yaml.safe_load(RECIPE.read_text())["seed"]["pretrain"]
    tokens_per_step = pretrain["seq_len"] * pretrain["batch_size"]
    points = []
    for steps in (int(s) for s in args.steps.split(",")):
        point = run_point(args.work / f"pretrain-{steps}", steps, args.overrides)
        point["tokens"] = steps * tokens_per_step
        points.append(point)
        print(
            f"seed steps {steps}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in point["losses"].items())
            + f" ({point['seconds'] / 60:.1f} min)",
            flush=True,
        )
    print(
        f"\n{'seed steps':>10} {'seed tokens':>12}" + "".join(f"{r:>10}" for r in ROWS) + f"{'BTX - best baseline':>22}"
    )
    for point in points:
        losses = point["losses"]
        margin = losses["tuned"] - min(losses["dense"], losses["upcycled"])
        print(
            f"{point['steps']:>10} {point['tokens']:>12,}"
            + "".join(f"{losses.get(r, float('nan')):>10.3f}" for r in ROWS)
            + f"{margin:>+22.3f}"
        )
    print(json.dumps(points))
    (args.work / "points.json").write_text(json.dumps(points))
    if args.plot:
        plot(points, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
