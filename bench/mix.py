"""Benchmark ``moekit mix`` as a user waits for it: the whole process, against copying its inputs and mergekit-moe.

Builds three distinct random bf16 Llama checkpoints (default: hidden 1024, FFN 4096, 16 layers,
16 heads / 8 KV heads, vocab 32k: about 608 MB each) and times, interleaved (A B C A B C ...),
best of ``--repeats``, each as a whole process followed by ``sync``:

* ``cp -r`` of the three inputs: the I/O floor;
* ``moekit mix --expert a=.. --expert b=.. --expert c=.. --seed-model a --seed-as none``
  (a 3-expert top-2 Mixtral, random router);
* ``mergekit-moe`` on the same inputs (gate_mode random), when ``--mergekit`` is given: it is
  installed into its own venv under the work directory on first use (needs PyPI).

Peak memory is the process tree's (bench/measure.py). Also timed: ``mix --upcycle`` of one input
into 4 experts, and ``mix --router centroid`` with the calibration's share of the time (mix
records it in the output's ``moekit.yaml``: ``router.calibration_seconds``).

    python bench/mix.py                 # cp vs moekit mix
    python bench/mix.py --mergekit      # also mergekit-moe (installs it into WORK/mergekit-venv)
Targets: mix <= 2.0 x cp; mergekit-moe / mix >= 3.0; peak memory < 0.6 GB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402  (bench/measure.py: whole-process timing)


def build_checkpoint(out: Path, seed: int, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Write a random bf16 Llama checkpoint with a tiny tokenizer (distinct weights per ``seed``); return its weight
    bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from moekit.io.writer import PlannedTensor, StreamingShardWriter
    from moekit.tiny import build_tokenizer, tiny_config

    out.mkdir(parents=True)
    build_tokenizer(out)
    config = tiny_config(
        "llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    plan = [PlannedTensor(n, torch.bfloat16, tuple(p.shape)) for n, p in skeleton.state_dict().items()]
    writer = StreamingShardWriter(out, plan, 2 << 30)
    generator = torch.Generator().manual_seed(seed)
    for tensor in plan:
        writer.write(tensor.name, (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    config.save_pretrained(out)
    return sum(t.nbytes for t in plan)


def mergekit_command(work: Path, inputs: list[Path], out: Path) -> list[str]:
    """mergekit-moe in its own venv (installed on first use), with a config for the same MoE."""
    venv = work.parent / "mergekit-venv"
    if not (venv / "bin" / "mergekit-moe").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "mergekit"], check=True)
    config = work / "mergekit.yml"
    experts = "".join(f'  - source_model: {p}\n    positive_prompts: ["x"]\n' for p in inputs)
    config.write_text(
        f"base_model: {inputs[0]}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n{experts}"
    )
    return [str(venv / "bin" / "mergekit-moe"), str(config), str(out)]


def synced(command: list[str], before: str = "") -> list[str]:
    """``command`` then ``sync``, as one shell command (what a user waits for includes the data reaching the disk)."""
    quoted = " ".join(f"'{c}'" for c in command)
    return ["sh", "-c", f"{before}{quoted} > /dev/null && sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", action="store_true", help="also time mergekit-moe (installed into its own venv)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to build (default: a temp dir); the mergekit venv goes next to it",
    )
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = args.workdir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moekit-bench-mix-", dir=base))
    try:
        inputs = [work / name for name in ("a", "b", "c")]
        size = sum(
            build_checkpoint(p, i + 1, args.layers, args.hidden, args.intermediate, args.vocab)
            for i, p in enumerate(inputs)
        )
        moekit = [
            sys.executable,
            "-m",
            "moekit",
            "mix",
            *(f"--expert={p.name}={p}" for p in inputs),
            "--seed-model",
            str(inputs[0]),
            "--seed-as",
            "none",
            "--out",
            str(work / "moe"),
            "--force",
        ]
        sides = {
            "cp -r": synced(
                ["cp", "-r", *map(str, inputs), str(work / "copy")],
                f"rm -rf '{work / 'copy'}' && mkdir '{work / 'copy'}' && ",
            ),
            "moekit mix": synced(moekit),
        }
        if args.mergekit:
            sides["mergekit-moe"] = synced(
                mergekit_command(work, inputs, work / "mergekit-out"), f"rm -rf '{work / 'mergekit-out'}' && "
            )
        runs: dict[str, list[tuple[float, float, str]]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, command in sides.items():
                subprocess.run(["sync"], check=True)
                runs[name].append(measure(command))
        upcycle = measure(
            synced(
                [
                    sys.executable,
                    "-m",
                    "moekit",
                    "mix",
                    "--upcycle",
                    str(inputs[0]),
                    "--experts",
                    "4",
                    "--out",
                    str(work / "upcycled"),
                    "--force",
                ]
            )
        )
        from moekit.tiny import domain_corpus

        data = []
        for name, domain in zip(("a", "b", "c"), ("code", "math", "prose")):
            (work / f"{domain}.txt").write_text(domain_corpus(domain, 400))
            data += ["--router-data", f"{name}={work / f'{domain}.txt'}"]
        centroid = measure(
            synced([*moekit, "--router", "centroid", *data, "--router-tokens", "2048", "--router-seq-len", "256"])
        )
        import yaml

        calibration = yaml.safe_load((work / "moe" / "moekit.yaml").read_text())["router"]["calibration_seconds"]
        out_bytes = sum(p.stat().st_size for p in (work / "moe").glob("*.safetensors"))
        print(
            f"inputs: 3 distinct bf16 llama checkpoints, {args.layers} layers, hidden {args.hidden}, FFN "
            f"{args.intermediate}, "
            f"vocab {args.vocab}: {size / 1e9:.2f} GB; mixed output {out_bytes / 1e9:.2f} GB"
        )
        best = {name: min(r[0] for r in results) for name, results in runs.items()}
        for name, results in runs.items():
            walls = ", ".join(f"{r[0]:.2f}" for r in results)
            print(
                f"{name:>13}: best {best[name]:6.2f} s (runs {walls}); peak memory {max(r[1] for r in results):6.0f} MB"
            )
        print(f"moekit mix / cp -r: {best['moekit mix'] / best['cp -r']:.2f} (target <= 2.0)")
        if "mergekit-moe" in best:
            print(f"mergekit-moe / moekit mix: {best['mergekit-moe'] / best['moekit mix']:.2f} (target >= 3.0)")
        print(f"mix --upcycle (4 experts of one input): {upcycle[0]:.2f} s, peak memory {upcycle[1]:.0f} MB")
        print(
            f"mix --router centroid (2048 tokens per domain): {centroid[0]:.2f} s, of which calibration "
            f"{calibration:.2f} s "
            f"({calibration / centroid[0]:.0%}); peak memory {centroid[1]:.0f} MB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
