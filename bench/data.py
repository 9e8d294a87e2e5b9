"""Benchmark the data path: ``moekit prepare`` against ``datasets.map``, and what training pays per corpus size.

Every figure is a whole process, timed from outside (start to exit) with its peak memory
sampled (bench/measure.py) over the whole process tree (psutil: the sum of PSS, so the pages forked
tokenising workers share with their parent count once):

* tokenisation: ``moekit prepare CORPUS --workers 2`` against the pipeline a user would write
  with ``datasets`` (``load_dataset("json")`` then ``Dataset.map(batched=True, num_proc=2)`` with
  the same tokenizer), interleaved A B A B, best of ``--repeats``; tokens/s and the ratio;
* peak RSS of ``prepare`` for each corpus size (target: flat, i.e. within 10% across sizes);
* a training step: ``moekit train`` on the prepared store for one step, for each size: wall time
  (start to the end of the first step: import, model load, opening the store) and peak RSS
  (targets: independent of the corpus size; under 1 GB beyond the model).

    python bench/data.py                      # the issue's sizes: 1 GB and 4 GB corpora (long on 2 cores)
    python bench/data.py --sizes 100MB,400MB  # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402  (bench/measure.py: whole-process timing)


def parse_size(text: str) -> int:
    """'1GB' -> bytes."""
    units = {"GB": 1 << 30, "MB": 1 << 20, "KB": 1 << 10}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_corpus(path: Path, size: int) -> None:
    """``size`` bytes of JSONL documents mixing the three synthetic domains (varied, seeded)."""
    from moekit.tiny import domain_corpus

    rng = random.Random(0)
    pool = [
        json.dumps({"text": domain_corpus(d, rng.randint(5, 40), seed=s)}) + "\n"
        for s in range(300)
        for d in ("code", "math", "prose")
    ]
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size:
            line = rng.choice(pool)
            handle.write(line)
            written += len(line)


DATASETS_PIPELINE = """
import sys
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
data = load_dataset("json", data_files=sys.argv[1], split="train", cache_dir=sys.argv[3])
def encode(batch):
    return {"ids": tok(batch["text"], add_special_tokens=False)["input_ids"]}
ids = data.map(encode, batched=True, num_proc=2, remove_columns=["text"])
print("rows", ids.num_rows)  # the tokens stay in datasets' Arrow cache on disk, as a user would keep them
"""


def bench_size(work: Path, size: int, seed: Path, repeats: int) -> dict:
    """Tokenisation (prepare vs datasets) and a one-step training process for one corpus size."""
    import shutil

    corpus = work / f"corpus-{size}.jsonl"
    write_corpus(corpus, size)
    moekit = [sys.executable, "-m", "moekit"]
    prepare, datasets_runs = [], []
    for repeat in range(repeats):  # interleaved: A B A B
        store = work / f"store-{size}"
        shutil.rmtree(store, ignore_errors=True)
        prepare.append(
            measure([*moekit, "prepare", str(corpus), "--tokenizer", str(seed), "--out", str(store), "--workers", "2"])
        )
        cache = work / f"hf-cache-{repeat}"
        datasets_runs.append(measure([sys.executable, "-c", DATASETS_PIPELINE, str(corpus), str(seed), str(cache)]))
        shutil.rmtree(cache, ignore_errors=True)
    tokens = json.loads((work / f"store-{size}" / "moekit-store.json").read_text())["tokens"]
    run = work / f"run-{size}"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run([*moekit, "branch", str(seed), str(run), "--domain", "code"], check=True, capture_output=True)
    train = measure(
        [
            *moekit,
            "train",
            str(run),
            "--data",
            f"code={work / f'store-{size}'}",
            "--max-steps",
            "1",
            "--seq-len",
            "256",
            "--batch-size",
            "4",
            "--eval-every",
            "0",
            "--eval-blocks",
            "1",
            "--val-fraction",
            "0.001",
        ]
    )
    best_prepare = min(prepare, key=lambda r: r[0])
    best_datasets = min(datasets_runs, key=lambda r: r[0])
    return {
        "size_bytes": size,
        "tokens": tokens,
        "prepare_s": best_prepare[0],
        "prepare_tokens_per_s": tokens / best_prepare[0],
        "prepare_peak_rss_mb": max(r[1] for r in prepare),
        "datasets_s": best_datasets[0],
        "datasets_tokens_per_s": tokens / best_datasets[0],
        "datasets_peak_rss_mb": max(r[1] for r in datasets_runs),
        "ratio_prepare_over_datasets": best_datasets[0] / best_prepare[0],
        "train_first_step_s": train[0],
        "train_peak_rss_mb": train[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1GB,4GB", help="corpus sizes, comma-separated (e.g. 100MB,400MB)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="interleaved runs of each tokeniser per size (best is reported)"
    )
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    from moekit.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        seed = build_tiny_model(
            work / "seed",
            "llama",
            init_std=0.02,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=1024,
        )
        rows = [bench_size(work, parse_size(s), seed, args.repeats) for s in args.sizes.split(",")]
    print(json.dumps(rows, indent=1))
    print(
        f"{'corpus':>10} {'tokens':>12} {'prepare tok/s':>14} {'datasets tok/s':>15} {'ratio':>6} {'prepare RSS':>12} "
        f"{'train 1st step':>15} {'train RSS':>10}"
    )
    for row in rows:
        print(
            f"{row['size_bytes'] / 2**20:>8.0f}MB {row['tokens']:>12,} {row['prepare_tokens_per_s']:>14,.0f} "
            f"{row['datasets_tokens_per_s']:>15,.0f} "
            f"{row['ratio_prepare_over_datasets']:>6.2f} {row['prepare_peak_rss_mb']:>10.0f}MB "
            f"{row['train_first_step_s']:>14.1f}s "
            f"{row['train_peak_rss_mb']:>8.0f}MB"
        )
    print("targets: ratio >= 1.0; prepare and train RSS flat across sizes (within 10%); first step independent of size")


if __name__ == "__main__":
    main()
