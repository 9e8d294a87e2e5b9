"""Benchmark ``moekit train``'s loop against a plain transformers ``Trainer``, in the same run.

Same model (a random Llama-family model built locally), same packed data, same micro-batch,
sequence length, optimiser (AdamW, wd 0.1), schedule (warmup + cosine) and precision (fp32 on
CPU). Throughput is measured over the steady state (timestamps from the end of step
``--skip`` to the last step), so start-up costs of either side do not count.

    python bench/train.py                 # defaults: hidden 256, 6 layers, seq 256, batch 8
Target: moekit tokens/s / Trainer tokens/s >= 1.0.

On a GPU (``--device cuda``, bf16): ``--preset 1b`` builds a ~1.2B Llama (hidden 2048, 16
layers, FFN 8192, vocab 32k); ``--moe-experts 4`` upcycles it into a 4-expert top-2 MoE
(``moekit mix --upcycle``) and times moekit's loop on that, with ``--experts-implementation``
``grouped_mm`` (transformers' default) or ``eager``. Besides tokens/s it prints the model-FLOPs
utilisation, MFU = tokens/s x (6 x active parameters + 12 x layers x hidden x seq) / peak FLOP/s
(``--peak-tflops``, default 989: an H100/H200's dense bf16 peak).

    python bench/train.py --device cuda --preset 1b --seq-len 2048 --batch-size 4 --steps 20
    python bench/train.py --device cuda --preset 1b --moe-experts 4 --experts-implementation eager
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {"1b": dict(hidden=2048, layers=16, intermediate=8192, vocab=32000)}


def build_inputs(
    work: Path, hidden: int, layers: int, intermediate: int | None = None, vocab: int | None = None
) -> tuple[Path, Path]:
    """A random seed model and a generated text file."""
    from moekit.tiny import build_tiny_model, domain_corpus

    extra = {"vocab_size": vocab} if vocab else {}
    seed = build_tiny_model(
        work / "seed",
        "llama",
        init_std=0.02,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        head_dim=64,
        max_position_embeddings=4096,
        **extra,
    )
    data = work / "data.txt"
    data.write_text("".join(domain_corpus(d, 6000, seed=1) for d in ("code", "math", "prose")))
    return seed, data


def bench_moekit(seed: Path, blocks: torch.Tensor, args: argparse.Namespace, work: Path) -> float:
    """Tokens/s of moekit's training loop."""
    from transformers import AutoModelForCausalLM

    from moekit.config import LoopSettings
    from moekit.train.loop import LoopJob, make_loop_engine, run_loop

    stamps: list[float] = []
    settings = LoopSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=1e-3,
        save_every=0,
        eval_every=0,
        precision="fp32",
    )
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    job = LoopJob(
        model,
        blocks,
        {},
        settings,
        work / "moekit",
        show_progress=False,
        on_step_end=lambda s, r: stamps.append(time.perf_counter()),
    )
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
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-3,
        weight_decay=0.1,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=args.steps // 10,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        adam_beta2=0.95,
    )
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[Stamp()]).train()
    return (len(stamps) - args.skip) * args.batch_size * args.seq_len / (stamps[-1] - stamps[args.skip - 1])


def flops_per_token(model_dir: Path, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters a token uses, plus attention (12 x layers x hidden x seq)."""
    from moekit.inspection.static import static_report
    from moekit.io.checkpoint import Checkpoint

    report = static_report(Checkpoint(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    return 6 * report["active_params"] + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq_len


def bench_gpu(model_dir: Path, blocks: torch.Tensor, args: argparse.Namespace, work: Path) -> None:
    """moekit's loop on a CUDA device: tokens/s and MFU."""
    from transformers import AutoModelForCausalLM

    from moekit.config import LoopSettings
    from moekit.train.loop import LoopJob, make_loop_engine, run_loop

    stamps: list[float] = []
    settings = LoopSettings(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=1e-4,
        save_every=0,
        eval_every=0,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    options = {"experts_implementation": args.experts_implementation} if args.moe_experts else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **options)
    job = LoopJob(
        model,
        blocks,
        {},
        settings,
        work / "moekit-gpu",
        show_progress=False,
        on_step_end=lambda s, r: (torch.cuda.synchronize(), stamps.append(time.perf_counter())),
    )
    run_loop(job, make_loop_engine(settings))
    speed = (len(stamps) - args.skip) * args.batch_size * args.seq_len / (stamps[-1] - stamps[args.skip - 1])
    mfu = speed * flops_per_token(model_dir, args.seq_len) / (args.peak_tflops * 1e12)
    kind = f"{args.moe_experts}-expert top-2 MoE ({args.experts_implementation})" if args.moe_experts else "dense"
    print(
        f"{torch.cuda.get_device_name()}: {kind}, {args.precision}, batch {args.batch_size} x seq {args.seq_len}: "
        f"{speed:,.0f} tokens/s, MFU {mfu:.1%} (peak {args.peak_tflops:.0f} TFLOP/s)"
    )


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
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: moekit's loop only, with tokens/s and MFU"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="model size preset (overrides --hidden/--layers)"
    )
    parser.add_argument("--precision", default="bf16", help="GPU precision (fp32 | bf16 | fp16)")
    parser.add_argument(
        "--moe-experts", type=int, default=0, help="GPU: upcycle into an N-expert top-2 MoE and time that"
    )
    parser.add_argument("--experts-implementation", default="grouped_mm", help="GPU MoE: grouped_mm | eager")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak, for MFU")
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps:
        parser.error("--skip must be at least 1 and less than --steps")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moekit.data import packed_blocks, token_stream

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    preset = PRESETS.get(args.preset or "", {})
    with tempfile.TemporaryDirectory(prefix="moekit-bench-train-") as tmp:
        work = Path(tmp)
        seed, data = build_inputs(
            work,
            preset.get("hidden", args.hidden),
            preset.get("layers", args.layers),
            preset.get("intermediate"),
            preset.get("vocab"),
        )
        blocks = packed_blocks(token_stream(AutoTokenizer.from_pretrained(seed), data), args.seq_len, data)
        if args.device == "cuda":
            model_dir = seed
            if args.moe_experts:
                from moekit.config import MixConfig, UpcycleSettings
                from moekit.steps.mix import mix

                model_dir = mix(
                    MixConfig(out=work / "moe", seed=str(seed), upcycle=UpcycleSettings(num_experts=args.moe_experts))
                ).out
            bench_gpu(model_dir, blocks, args, work)
            return
        trainer_runs, moekit_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            trainer_runs.append(bench_trainer(seed, blocks, args, work))
            moekit_runs.append(bench_moekit(seed, blocks, args, work))
        trainer, moekit_speed = max(trainer_runs), max(moekit_runs)
        print(
            f"model: llama, hidden {args.hidden}, {args.layers} layers; batch {args.batch_size} x seq "
            f"{args.seq_len}; fp32 on {torch.get_num_threads()} threads"
        )
        print(f"transformers Trainer: {trainer:9,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in trainer_runs)})")
        print(
            f"moekit train loop:    {moekit_speed:9,.0f} tokens/s (runs: {', '.join(f'{r:,.0f}' for r in moekit_runs)})"
        )
        print(f"ratio moekit / Trainer: {moekit_speed / trainer:.3f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
