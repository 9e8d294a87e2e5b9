"""Benchmark ``moekit train``'s loop against a plain transformers ``Trainer``, in the same run.

Same model (a random Llama-family model built locally), same packed data, same micro-batch,
sequence length, optimiser (AdamW, wd 0.1), schedule (warmup + cosine) and precision (fp32 on
CPU). Throughput is measured over the steady state (timestamps from the end of step
``--skip`` to the last step), so start-up costs of either side do not count.

    python bench/train.py                 # defaults: hidden 256, 6 layers, seq 256, batch 8
Target: moekit tokens/s / Trainer tokens/s >= 1.0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def build_inputs(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """A random seed model and a generated text file."""
    from moekit.tiny import build_tiny_model, domain_corpus

    seed = build_tiny_model(
        work / "seed", "llama", init_std=0.02, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, head_dim=64,
    )
    data = work / "data.txt"
    data.write_text("".join(domain_corpus(d, 6000, seed=1) for d in ("code", "math", "prose")))
    return seed, data


def bench_moekit(seed: Path, blocks: torch.Tensor, args: argparse.Namespace, work: Path) -> float:
    """Tokens/s of moekit's training loop."""
    from transformers import AutoModelForCausalLM

    from moekit.config import LoopSettings
    from moekit.training import LoopJob, make_loop_engine, run_loop

    stamps: list[float] = []
    settings = LoopSettings(seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps, lr=1e-3, save_every=0, eval_every=0, precision="fp32")
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    job = LoopJob(model, blocks, {}, settings, work / "moekit", show_progress=False, on_step_end=lambda s, r: stamps.append(time.perf_counter()))
    run_loop(job, make_loop_engine(settings))
    return (len(stamps) - args.skip) * args.batch_size * args.seq_len / (stamps[-1] - stamps[args.skip - 1])


def bench_trainer(seed: Path, blocks: torch.Tensor, args: argparse.Namespace, work: Path) -> float:
    """Tokens/s of transformers' Trainer on the same blocks."""
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            stamps.append(time.perf_counter())

    dataset = [{"input_ids": row, "labels": row} for row in blocks.long()]
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=1e-3,
        weight_decay=0.1, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=args.steps // 10, logging_steps=10_000, save_strategy="no",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, adam_beta2=0.95,
    )
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[Stamp()]).train()
    return (len(stamps) - args.skip) * args.batch_size * args.seq_len / (stamps[-1] - stamps[args.skip - 1])


def main() -> None:
    """Run both, print tokens/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3, help="steps excluded from timing (warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the best counts")
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps:
        parser.error("--skip must be at least 1 and less than --steps")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moekit.data import packed_blocks, token_stream

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="moekit-bench-train-") as tmp:
        work = Path(tmp)
        seed, data = build_inputs(work, args.hidden, args.layers)
        blocks = packed_blocks(token_stream(AutoTokenizer.from_pretrained(seed), data), args.seq_len, data)
        trainer_runs, moekit_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            trainer_runs.append(bench_trainer(seed, blocks, args, work))
            moekit_runs.append(bench_moekit(seed, blocks, args, work))
        trainer, moekit_speed = max(trainer_runs), max(moekit_runs)
        print(f"model: llama, hidden {args.hidden}, {args.layers} layers; batch {args.batch_size} x seq {args.seq_len}; fp32 on {torch.get_num_threads()} threads")
        print(f"transformers Trainer: {trainer:9,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in trainer_runs)})")
        print(f"moekit train loop:    {moekit_speed:9,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in moekit_runs)})")
        print(f"ratio moekit / Trainer: {moekit_speed / trainer:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
