"""Benchmark ``moekit run``'s launchers: branches in parallel against one after another, and Slurm's latency.

1. The train stage of a two-domain recipe (a random Llama seed built here; the seed and branch stages done once
   beforehand and copied for every run, untimed), as a user runs it: the whole ``moekit run RECIPE
   stages=[train]`` process, ``--launcher local`` (two jobs at a time, one CPU thread each) against ``--launcher
   inline`` (one process, both threads), interleaved over ``--repeats``, for each ``--sizes`` (hidden width).
   On a CPU the two jobs share the cores that one job's threads would use, so the best ratio is the threads'
   own scaling: bound = (tokens/s with 2 threads) / (2 x tokens/s with 1 thread), measured here too and
   printed beside the ratio. On a GPU machine (a GPU per job) the bound is 1 / jobs. Target: <= 0.65.
   A third run, inline on one thread, stands for what a GPU machine shows (a GPU per job, where one job
   cannot use the others' GPUs): local / inline-on-1-thread, ideal 0.5.
2. With ``--slurm`` (needs root and Debian's slurm-wlm and munge): a one-node Slurm cluster is started, the
   tiny recipe with one domain runs under ``--launcher slurm`` (seed, branch, train, mix, tune, eval: a chain,
   so each job finds the node idle), and for every job the added latency is printed: from the moment it could
   start (submitted, and every stage it needs ended) to the start of its batch script; and the process
   start-up, from the batch script to moekit's first line of work. Target: latency < 5 s.

    python bench/launch.py                        # part 1, hidden 64 and 256
    python bench/launch.py --sizes 128 --slurm    # part 1 at hidden 128, and part 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/launchers/cluster.py: the one-node cluster
from measure import measure  # noqa: E402  (bench/measure.py: whole-process timing)

SEQ_LEN, BATCH = 128, 8


def model_config(hidden: int) -> dict[str, int]:
    """A Llama of width ``hidden``, 4 layers."""
    heads = max(1, hidden // 64)
    return dict(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=4, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), head_dim=64,
    )  # fmt: skip


def thread_scaling(hidden: int) -> tuple[float, float]:
    """Training tokens/s of the model with 1 and with 2 CPU threads (in this process)."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, **model_config(hidden)))
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 1024, (BATCH, SEQ_LEN))
    speeds = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for step in range(13):
            if step == 3:
                started = time.perf_counter()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        speeds.append(10 * BATCH * SEQ_LEN / (time.perf_counter() - started))
    return speeds[0], speeds[1]


def write_recipe(work: Path, hidden: int, steps: int) -> Path:
    """A two-domain recipe on a random seed built here."""
    from moekit.tiny import build_tiny_model

    seed = build_tiny_model(work / "seed-model", "llama", init_std=0.02, **model_config(hidden))
    recipe = {
        "name": "bench-launch",
        "workdir": str(work / "base"),
        "seed": {"path": str(seed)},
        "domains": {"code": {"data": ["builtin:code-lines"]}, "math": {"data": ["builtin:math-lines"]}},
        "train": {
            "seq_len": SEQ_LEN,
            "batch_size": BATCH,
            "max_steps": steps,
            "lr": 1e-3,
            "eval_every": 0,
            "save_every": 0,
        },  # fmt: skip
    }
    path = work / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def moekit(*args: str) -> list[str]:
    return [sys.executable, "-m", "moekit", *args]


MODES = {  # name: (launcher, environment)
    "inline": ("inline", {}),
    "inline-1": ("inline", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
    "local": ("local", {}),
}


def bench_parallel(work: Path, hidden: int, steps: int, repeats: int) -> None:
    recipe = write_recipe(work, hidden, steps)
    base = work / "base"
    measure(moekit("run", str(recipe), f"workdir={base}", "stages=[branch]"))  # untimed setup
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        for mode in list(MODES)[repeat % 3 :] + list(MODES)[: repeat % 3]:  # interleaved, each first in turn
            launcher, env = MODES[mode]
            run = work / f"{mode}-{repeat}"
            shutil.copytree(base, run, symlinks=True)
            command = moekit(
                "run", str(recipe), f"workdir={run}", "stages=[train]", "--launcher", launcher,
                "launcher.local.max_parallel=2",
            )  # fmt: skip
            wall, peak, _ = measure(command, env)
            times[mode].append(wall)
            print(f"  hidden {hidden}, {mode:8s} run {repeat + 1}: {wall:6.1f} s, peak memory {peak:.0f} MB")
            shutil.rmtree(run)
    one, two = thread_scaling(hidden)
    median = {mode: statistics.median(values) for mode, values in times.items()}
    ratios = [local / inline for local, inline in zip(times["local"], times["inline"])]
    per_device = [local / inline for local, inline in zip(times["local"], times["inline-1"])]
    print(
        f"train stage, hidden {hidden}, 2 domains x {steps} steps: inline (2 threads) {median['inline']:.1f} s, "
        f"inline on 1 thread {median['inline-1']:.1f} s, local (2 jobs x 1 thread) {median['local']:.1f} s (medians)\n"
        f"  local / inline: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
        f"the CPU's bound {two / (2 * one):.2f} ({one:,.0f} tok/s on 1 thread, {two:,.0f} on 2) (target <= 0.65)\n"
        f"  local / inline on 1 thread (a core per job, as a GPU per job): median {statistics.median(per_device):.2f} "
        f"(min {min(per_device):.2f}, max {max(per_device):.2f}); ideal 0.50",
        flush=True,
    )


def bench_slurm(work: Path) -> None:
    from tests.launchers.cluster import OneNodeSlurm

    cluster = OneNodeSlurm(work / "slurm")
    cluster.start()
    try:
        import os

        os.environ.update(cluster.env())
        tiny = Path(__file__).resolve().parents[1] / "moekit" / "recipes" / "demo-tiny.yaml"
        run = work / "slurm-run"
        command = moekit(
            "run",
            str(tiny),
            f"workdir={run}",
            "--launcher",
            "slurm",
            "launcher.slurm.cpus_per_task=1",
            "launcher.poll_seconds=1",
            "domains={code: {data: [builtin:code-lines]}}",
            "mix.router=random",
            "stages=[seed,branch,train,mix,tune,eval]",
        )  # fmt: skip  (a chain: each job finds the node idle, so its wait is Slurm's alone)
        wall, _, _ = measure(command)
        report_latency(run, wall)
    finally:
        cluster.stop()


def report_latency(run: Path, wall: float) -> None:
    from moekit.recipe import load_recipe
    from moekit.steps.run import plan_run
    from moekit.steps.run.jobs import load_jobs, read_state

    jobs = load_jobs(run)
    plan = {p.name: p for p in plan_run(load_recipe(run / "recipe.yaml"))}
    latencies, startups = [], []
    for name, job in jobs.items():
        said = read_state(run, name)
        ready = max([job.submitted] + [read_state(run, need)["ended"] for need in plan[name].needs])
        latencies.append(said["scheduled"] - ready)
        startups.append(said["started"] - said["scheduled"])
        print(f"  {name:12s} latency {latencies[-1]:5.2f} s, start-up {startups[-1]:5.2f} s")
    print(
        f"slurm, {len(jobs)} jobs in {wall:.0f} s: added latency per stage median "
        f"{statistics.median(latencies):.2f} s, "
        f"max {max(latencies):.2f} s (target < 5 s); process start-up median {statistics.median(startups):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,256", help="hidden widths of the seed, comma-separated")
    parser.add_argument("--tokens", type=int, default=600_000, help="training tokens per branch (sets the steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slurm", action="store_true", help="also time the slurm launcher on a one-node cluster")
    args = parser.parse_args()
    for hidden in (int(size) for size in args.sizes.split(",") if size):  # --sizes "": the Slurm part only
        steps = max(10, args.tokens // (SEQ_LEN * BATCH) // max(1, hidden // 64))  # wider: fewer steps, similar time
        with tempfile.TemporaryDirectory(prefix="moekit-bench-launch-") as tmp:
            bench_parallel(Path(tmp), hidden, steps, args.repeats)
    if args.slurm:
        with tempfile.TemporaryDirectory(prefix="moekit-bench-slurm-") as tmp:
            bench_slurm(Path(tmp))


if __name__ == "__main__":
    main()
