"""Benchmark ``moekit mix`` against a plain copy of its input files, in the same run.

Builds a Llama-family seed of a few hundred MB (bf16, random weights written straight to
safetensors), branches it into three real copies, then measures:

* the time to copy every input file (seed + branches) with shutil: the I/O floor;
* ``mix`` (3 branches + the seed expert, random router) in a fresh process: wall time and
  peak RSS, plus the RSS of the same process after its imports only (the floor that does
  not depend on the model).

Run twice with different depths to see that peak RSS does not grow with model size:
    python bench/mix.py --layers 4 && python bench/mix.py --layers 16
Targets: mix time / copy time <= 2; peak RSS flat in model size (< ~0.6 GB at 3 x 600 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The child reads its peak RSS from VmHWM: getrusage's ru_maxrss survives fork+exec on Linux
# and would report the parent's peak (the bench builds the model in memory).
CHILD = """
import json, sys, time
from pathlib import Path
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from moekit.config import MixConfig
from moekit.steps.mix import mix
from moekit.steps.mix_inputs import experts_from_run_dir
import transformers.models.auto  # mix imports it lazily; count it in the floor, not in the work
floor = peak_kb()
run = Path(sys.argv[1])
seed, experts = experts_from_run_dir(run)
start = time.perf_counter()
mix(MixConfig(out=Path(sys.argv[2]), seed=seed, experts=experts))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_kb": peak_kb(), "floor_rss_kb": floor}))
"""


def build_seed(out: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Write a random bf16 Llama seed with a tiny tokenizer; return its weight bytes."""
    from transformers import AutoModelForCausalLM

    from moekit.io.writer import PlannedTensor, StreamingShardWriter
    from moekit.tiny import build_tokenizer, tiny_config

    out.mkdir(parents=True)
    build_tokenizer(out)
    config = tiny_config(
        "llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, head_dim=64, dtype="bfloat16",
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    writer = StreamingShardWriter(out, plan, 2 << 30)
    gen = torch.Generator().manual_seed(0)
    for tensor in plan:
        writer.write(tensor.name, (torch.randn(tensor.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(out)
    return sum(t.nbytes for t in plan)


def main() -> None:
    """Build inputs, time a plain copy and a mix, print the figures and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temp dir)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from moekit.steps.branch import branch

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-", dir=args.workdir))
    try:
        size = build_seed(work / "seed", args.layers, args.hidden, args.intermediate, args.vocab)
        branch(str(work / "seed"), work / "run", ["code", "math", "wiki"], copy=True)
        inputs = [p for d in [work / "seed", *sorted((work / "run" / "branches").iterdir())] for p in d.glob("*.safetensors")]

        start = time.perf_counter()
        for i, path in enumerate(inputs):
            shutil.copyfile(path, work / f"copy-{i}.safetensors")
        copy_seconds = time.perf_counter() - start
        for path in work.glob("copy-*.safetensors"):
            path.unlink()

        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(work / "run"), str(work / "mixed")], capture_output=True, text=True, check=True
        )
        stats = json.loads(child.stdout.strip().splitlines()[-1])
        out_bytes = sum(p.stat().st_size for p in (work / "mixed").glob("*.safetensors"))
        print(f"model: llama bf16, {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, vocab {args.vocab}")
        print(f"input: seed + 3 branches x {size / 1e6:,.0f} MB = {len(inputs) * size / 1e9:.2f} GB; output {out_bytes / 1e9:.2f} GB")
        print(f"plain copy of the inputs: {copy_seconds:7.2f} s")
        print(f"moekit mix:               {stats['seconds']:7.2f} s")
        print(f"ratio mix / copy:         {stats['seconds'] / copy_seconds:7.2f}  (target <= 2)")
        print(f"peak RSS of mix process:  {stats['peak_rss_kb'] / 1024:7.0f} MB (after imports only: {stats['floor_rss_kb'] / 1024:.0f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
