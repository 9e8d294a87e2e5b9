"""What attention experts (BAM) cost at inference: ``moekit generate`` on a BAM MoE against the BTX MoE of the same run.

Times the whole command as a process (what a user waits for) and reads the generation's own
tokens/s line, interleaving the models so that machine noise hits them alike; prints the medians
and the ratio BAM / BTX. The models must come from the same seed and branches (e.g. two runs of
bench/baselines.py: its default run and its ``bam-shared`` / ``bam-expert`` runs):

    python bench/attention_experts.py --btx /scratch/conv/default-r0/run/tuned \\
        --bam shared=/scratch/conv/bam-shared-r0/run/tuned --bam expert=/scratch/conv/bam-expert-r0/run/tuned
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from measure import measure

PROMPT = "def fibonacci(n):\n    "
_RATE = re.compile(r"(\d+) tokens in ([0-9.]+) s")


def generate(model: Path, tokens: int) -> tuple[float, float]:
    """(whole-command seconds, generation tokens/s) of one ``moekit generate`` greedy run (tokens/s as the command
    reports it: generated tokens over generation time, however many there were before an end token)."""
    command = [sys.executable, "-m", "moekit", "generate", str(model), "--prompt", PROMPT, "--raw"]
    seconds, _, output = measure([*command, "--max-new-tokens", str(tokens)])
    found = _RATE.search(output)
    if found is None:
        raise SystemExit(f"no tokens/s line in the output of {model}:\n{output[-2000:]}")
    return seconds, int(found.group(1)) / float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--btx", type=Path, required=True, help="the BTX MoE (baseline)")
    parser.add_argument("--bam", action="append", required=True, metavar="NAME=DIR", help="a BAM MoE; repeat")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    models = {"btx": args.btx, **{k: Path(v) for k, _, v in (b.partition("=") for b in args.bam)}}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved
            runs[name].append(generate(model, args.tokens))
    base_rate = statistics.median(r for _, r in runs["btx"])
    print(f"{'model':<10}{'command s':>11}{'tokens/s':>10}{'vs BTX':>8}   ({args.tokens} tokens, {args.repeats} runs)")
    for name, results in runs.items():
        seconds, rate = statistics.median(s for s, _ in results), statistics.median(r for _, r in results)
        print(f"{name:<10}{seconds:>11.2f}{rate:>10.1f}{rate / base_rate:>8.2f}")


if __name__ == "__main__":
    main()
