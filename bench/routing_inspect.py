"""Benchmark ``moekit inspect``'s routing pass against a plain forward pass, in the same run.

Same MoE (a random Llama seed upcycled to 4 experts with drop-upcycling, built locally), same
blocks and batch. Plain: ``model(input_ids)`` under no_grad. Inspect: the same forward with
moekit's router hooks tallying assignments, top-1, co-selection, router entropy and z.
Interleaved over ``--repeats``, best of each kept. Target: inspect tokens/s >= 0.9 x plain.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    """Time both passes and print tokens/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.data import packed_blocks, token_stream
    from moekit.inspection.routing import collect_routing
    from moekit.progress import quiet_transformers
    from moekit.tiny import domain_corpus

    sys.path.insert(0, str(Path(__file__).parent))
    from tune import build_moe  # the same locally built MoE as bench/tune.py

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="moekit-bench-inspect-") as tmp:
        work = Path(tmp)
        moe = build_moe(work, args.hidden, args.layers)
        (work / "data.txt").write_text("".join(domain_corpus(d, 3000, seed=2) for d in ("code", "math", "prose")))
        blocks = packed_blocks(
            token_stream(AutoTokenizer.from_pretrained(moe), work / "data.txt"), args.seq_len, "data"
        )[: args.blocks]
        model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
        tokens = blocks.numel()
        plain_runs, inspect_runs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                for chunk in blocks.split(args.batch_size):
                    model(input_ids=chunk.long())
            plain_runs.append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            collect_routing(model, {"data": blocks}, args.batch_size, lambda n: None)
            inspect_runs.append(tokens / (time.perf_counter() - start))
        plain, inspected = max(plain_runs), max(inspect_runs)
        print(
            f"MoE: 4 experts top-2, hidden {args.hidden}, {args.layers} layers; {tokens:,} tokens in batches of "
            f"{args.batch_size} x {args.seq_len}"
        )
        print(f"plain forward:      {plain:10,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in plain_runs)})")
        print(f"inspect (hooks):    {inspected:10,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in inspect_runs)})")
        print(f"ratio inspect / plain: {inspected / plain:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
