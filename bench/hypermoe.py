"""HyperMoE (``tune --hypermoe``) against a plain tune, and what its per-set adapters cost in memory and speed.

Three parts, in one run:

1. **Memory of a tune step** (forward + backward, one 1024-token sequence) on a moekit_moe MoE
   of hidden 1024 (4 experts top-2, 2 layers, HyperMoE's default sizes), each in a fresh
   process (peak RSS): without HyperMoE, with moekit's per-set adapters (one per distinct set of
   selected experts), and with per-token adapters as the reference implementation generates
   them. The growth over the plain step is printed next to the size of the distinct sets'
   adapter weights.
2. **Quality at equal steps and at equal wall time**: the demo's three domains, a small seed
   pretrained here and three trained branches (as bench/balancing.py), mixed into a moekit_moe
   MoE with the centroid router. Tuned with the experts frozen: plain router tuning (``--train
   router``) for N steps, HyperMoE (routers + its modules) for N steps, and plain router tuning
   for as many steps as fit in HyperMoE's wall time; and, for scale, BTX's own tune (``--train
   all``: every parameter) for N steps. 3 repeats (data-order seeds); held-out loss per domain,
   mean and spread.
3. **Parameters and ``moekit generate`` tokens/s** of the HyperMoE model against the plain one
   (whole command, interleaved, median of 5).

    .venv/bin/python bench/hypermoe.py [--work DIR] [--tune-steps 80] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from attention_experts import generate  # noqa: E402
from balancing import DOMAINS, build_branches, build_parser  # noqa: E402

MEMORY_STEP = """
import resource, sys, torch
from transformers import AutoModelForCausalLM
import moekit.modeling.modeling_moekit_moe as mm
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
mode = sys.argv[2]
if mode != "plain":
    model.enable_hypermoe()
    for module in model.hypernet.modules():  # non-zero heads: every adapter is computed for real
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0, 0.02)
if mode == "per-token":  # the reference implementation: one generated adapter per token
    def per_token(self, flat, indices):
        selected = torch.zeros(flat.shape[0], self.gate.num_experts, dtype=torch.bool).scatter_(1, indices, True)
        down, down_bias, up, up_bias = self._hypernet[0](self.hyper(selected), self.layer_idx)
        inner = torch.relu(torch.einsum("nah,nh->na", down, flat) + down_bias)
        return (torch.einsum("nha,na->nh", up, inner) + up_bias).float()
    mm.MoekitSparseMoeBlock._hyper_output = per_token
ids = torch.randint(0, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
model(ids, labels=ids).loss.backward()
hyper = sum(p.numel() for n, p in model.named_parameters() if n.startswith("hypernet.") or ".mlp.hyper." in n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, hyper)
"""


def memory_part(work: Path) -> None:
    """Peak RSS of one tune step: plain, per-set (moekit), per-token (reference)."""
    from moekit.config import MixConfig
    from moekit.steps.branch import branch
    from moekit.steps.mix import mix
    from moekit.tiny import build_tiny_model, perturb_model

    seed = build_tiny_model(
        work / "mem-seed",
        "llama",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    run = branch(str(seed), work / "mem-run", ["a", "b", "c"])
    for i, path in enumerate(run.branches.values()):
        perturb_model(path, seed=i + 1, scale=0.05)
    moe = mix(MixConfig(out=work / "mem-moe", seed=str(seed), experts=list(run.branches.items()), target="moekit_moe"))
    peaks, hyper_parameters = {}, 0
    for mode in ("plain", "per-set", "per-token"):
        done = subprocess.run(
            [sys.executable, "-c", MEMORY_STEP, str(moe.out), mode], capture_output=True, text=True, check=True
        )
        peaks[mode], hyper_parameters = (
            float(done.stdout.split()[0]),
            max(hyper_parameters, int(done.stdout.split()[1])),
        )
    own = hyper_parameters * 4 * 2 / 2**20  # HyperMoE's fp32 parameters and their gradients
    hidden, adapter, sets, layers, tokens = 1024, 64, 6, 2, 1024
    per_set_weights = layers * sets * (2 * hidden * adapter + adapter + hidden) * 4 / 2**20
    per_token_weights = layers * tokens * (2 * hidden * adapter + adapter + hidden) * 4 / 2**20
    print("\n## Memory of a tune step (1024 tokens, hidden 1024, 2 layers, 4 experts top-2, peak RSS)\n")
    print(f"HyperMoE's own parameters: {hyper_parameters:,} ({own:.0f} MB with their fp32 gradients)\n")
    print("| mode | peak RSS MB | growth over plain MB | growth beyond HyperMoE's parameters + gradients MB | "
          "generated adapter weights MB |")  # fmt: skip
    print("|---|---|---|---|---|")
    print(f"| plain MoE | {peaks['plain']:.0f} | | | |")
    grown = {mode: peaks[mode] - peaks["plain"] for mode in peaks}
    print(f"| HyperMoE, one adapter per distinct set (moekit) | {peaks['per-set']:.0f} | {grown['per-set']:.0f} | "
          f"{grown['per-set'] - own:.0f} | {per_set_weights:.1f} (at most C(4,2) = 6 sets a layer) |")  # fmt: skip
    print(f"| HyperMoE, one adapter per token (reference) | {peaks['per-token']:.0f} | {grown['per-token']:.0f} | "
          f"{grown['per-token'] - own:.0f} | {per_token_weights:.0f} |")  # fmt: skip


def tune_once(moe: Path, data: dict, out: Path, args: argparse.Namespace, steps: int, seed: int, **options) -> dict:
    """One tune: held-out loss per domain and wall seconds."""
    from moekit.config import LoopSettings, TuneConfig
    from moekit.steps.tune import tune

    loop = LoopSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=steps,
        lr=2e-3,
        warmup_steps=10,
        eval_every=0,
        eval_blocks=16,
        save_every=0,
        seed=seed,
    )
    started = time.perf_counter()
    result = tune(TuneConfig(model=moe, out=out, data=data, loop=loop, force=True, **options), show_progress=False)
    losses = {d: result.eval.get(f"eval/{d}/loss", result.eval.get(d)) for d in DOMAINS}
    return {"eval": losses, "seconds": time.perf_counter() - started}


def quality_part(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Plain router tuning vs HyperMoE at equal steps and equal wall time; returns (plain, hypermoe) tuned dirs."""
    from moekit.config import MixConfig
    from moekit.steps.mix import mix

    run_dir, seed, data = build_branches(work, args)
    moe = mix(
        MixConfig(
            out=work / "moe",
            seed=str(seed),
            experts=[(d, run_dir / "branches" / d) for d in DOMAINS],
            target="moekit_moe",
            router="centroid",
            router_data={d: specs[0] for d, specs in data.items()},
            router_tokens=4096,
            force=True,
        ),
        show_progress=False,
    ).out
    rows: dict[str, list[dict]] = {
        "plain (router), N steps": [],
        "HyperMoE, N steps": [],
        "plain (router), HyperMoE's time": [],
        "plain (all: BTX's tune), N steps": [],
    }
    for repeat in range(args.repeats):
        plain = tune_once(moe, data, work / f"plain-{repeat}", args, args.tune_steps, repeat, train="router")
        hyper = tune_once(moe, data, work / f"hyper-{repeat}", args, args.tune_steps, repeat, hypermoe={})
        matched = max(1, round(args.tune_steps * hyper["seconds"] / plain["seconds"]))
        timed = tune_once(moe, data, work / f"timed-{repeat}", args, matched, repeat, train="router")
        timed["steps"] = matched
        everything = tune_once(moe, data, work / f"all-{repeat}", args, args.tune_steps, repeat, train="all")
        for name, row in zip(rows, (plain, hyper, timed, everything), strict=True):
            rows[name].append(row)
    print(f"\n## Quality: {args.tune_steps} tune steps x {args.batch_size} x {args.seq_len} tokens, experts frozen, "
          f"{args.repeats} repeats (mean, min-max)\n")  # fmt: skip
    print("| variant | " + " | ".join(f"held-out loss {d}" for d in DOMAINS) + " | mean | seconds | steps |")
    print("|---|" + "---|" * (len(DOMAINS) + 3))
    for name, results in rows.items():
        cells = []
        for domain in [*DOMAINS, "mean"]:
            values = [statistics.mean(r["eval"].values()) if domain == "mean" else r["eval"][domain] for r in results]
            cells.append(f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})")
        steps = results[0].get("steps", args.tune_steps)
        seconds = statistics.mean(r["seconds"] for r in results)
        print(f"| {name} | {' | '.join(cells)} | {seconds:.0f} | {steps} |")
    return work / "plain-0", work / "hyper-0"


def speed_part(plain: Path, hyper: Path, repeats: int) -> None:
    """Parameters and ``moekit generate`` tokens/s, HyperMoE against plain."""
    from safetensors import safe_open

    def parameters(model: Path) -> int:
        total = 0
        for shard in model.glob("*.safetensors"):
            with safe_open(shard, "pt") as handle:
                total += sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
        return total

    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "hypermoe": []}
    for _ in range(repeats):
        for name, model in (("plain", plain), ("hypermoe", hyper)):
            runs[name].append(generate(model, 64))
    base = statistics.median(r for _, r in runs["plain"])
    print("\n## Parameters and generation (moekit generate, 64 tokens, greedy, median of runs)\n")
    print("| model | parameters | command s | tokens/s | vs plain |")
    print("|---|---|---|---|---|")
    for name, model in (("plain", plain), ("hypermoe", hyper)):
        seconds = statistics.median(s for s, _ in runs[name])
        rate = statistics.median(r for _, r in runs[name])
        print(f"| {name} | {parameters(model):,} | {seconds:.2f} | {rate:.1f} | {rate / base:.2f} |")


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def main() -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["memory", "quality"], help="skip a part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if "memory" not in args.skip:
            memory_part(work)
        if "quality" not in args.skip:
            plain, hyper = quality_part(work, args)
            speed_part(plain, hyper, 5)
    print(json.dumps({"args": vars(args)}, default=str))


if __name__ == "__main__":
    main()
