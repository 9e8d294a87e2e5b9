"""Every GPU path of moekit, run once and measured, in one command (also runs on a CPU, tiny, which CI does).

    python bench/device_check.py                           # on a GPU: a ~0.9B Llama, bf16 (a few minutes)
    python bench/device_check.py --device cpu --size tiny  # the same parts on a CPU in about a minute

Parts, each printed as one line ``PASS|FAIL  what: figure``:

1. bf16 training steps of a dense Llama built from a config (no download), plain and under FSDP2
   (one process): tokens/s, and MFU (model FLOPs from ``moekit.train.compute`` over the card's
   dense bf16 peak, looked up from the device name; n/a on a CPU);
2. its 4-expert top-2 MoE (``mix --upcycle``): training steps with transformers' ``grouped_mm``
   experts and with the ``eager`` loop, tokens/s of each and their ratio;
3. ``mix --router centroid`` and ``mix --add-expert`` (their calibration runs on the device);
4. greedy generation with and without the KV cache: the same tokens;
5. a checkpoint saved and resumed on the device ends bit-identical to an uninterrupted run.

``--json FILE`` writes every figure. The exit code is the number of failed parts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, for the resume check

import torch  # noqa: E402

from moekit.steps.seed import SIZES as SEED_SIZES  # noqa: E402

SIZES = {
    # ~0.89B parameters: 16 layers of hidden 2048, FFN 5632, GQA 16/8 heads of 128, a 32k vocabulary (untied)
    "gpu": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        seq=2048,
        batch=4,
        steps=12,
        warmup=4,
    ),
    "tiny": dict(**SEED_SIZES["tiny"], seq=64, batch=4, steps=6, warmup=2),  # the size of a tiny pretrained seed
}
# Dense bf16 peak FLOP/s of the cards moekit is likely to meet (the makers' figures, without sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}
RESULTS: list[dict] = []


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, device name); None where unknown (a CPU)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None), name


def report(ok: bool, what: str, figure: str, **numbers: float | str | None) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}: {figure}", flush=True)
    RESULTS.append({"part": what, "pass": ok, "figure": figure, **numbers})


def part(what: str):
    """Run a part; an exception is its FAIL line (with the traceback), not the end of the check."""

    def wrap(function):
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every part reports, whatever breaks
                traceback.print_exc()
                report(False, what, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                return None

        return run

    return wrap


def build_seed(work: Path, size: dict) -> Path:
    """A random dense Llama of ``size`` with a small tokenizer, saved in bf16 (as real seeds are)."""
    from moekit.tiny import build_tiny_model

    config = {k: v for k, v in size.items() if k not in ("seq", "batch", "steps", "warmup")}
    if size is SIZES["gpu"]:
        config["vocab_size"] = 32000  # a real vocabulary: the LM head is a real share of the FLOPs
    return build_tiny_model(
        work / "seed",
        "llama",
        dtype=torch.bfloat16,
        init_std=0.02,
        max_position_embeddings=max(4096, size["seq"]),
        **config,
    )


def train_steps(model_dir: Path, size: dict, device: str, shard: str, work: Path, **load: str) -> float:
    """Tokens/s of bf16 training steps (after the warm-up steps) of the model at ``model_dir``."""
    from moekit.config import LoopSettings
    from moekit.io.loading import load_causal_lm
    from moekit.train.engine import make_engine
    from moekit.train.loop import LoopJob, run_loop

    model = load_causal_lm(model_dir, torch.float32, **load)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, min(vocab, 512), (size["batch"] * size["steps"], size["seq"]), generator=generator)
    settings = LoopSettings(
        seq_len=size["seq"],
        batch_size=size["batch"],
        max_steps=size["steps"],
        eval_every=0,
        save_every=0,
        precision="bf16",
        shard=shard,
        warmup_steps=1,
    )
    engine = make_engine(shard, "bf16", device)
    try:
        run_loop(LoopJob(model, blocks, {}, settings, work, show_progress=False), engine)
    finally:
        engine.close()
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][size["warmup"] :]
    return len(timed) / sum(1 / t for t in timed)  # harmonic mean: total tokens over total time


@part("dense bf16 training")
def check_dense(seed: Path, size: dict, device: str, work: Path) -> None:
    from transformers import AutoConfig

    from moekit.train.compute import compute_of

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(seed))
    flops = compute_of(skeleton, None, 1).training_flops_per_token(size["seq"])
    peak, name = peak_tflops(torch.device(device))
    for shard in ("none", "fsdp"):
        speed = train_steps(seed, size, device, shard, work / f"dense-{shard}")
        mfu = speed * flops / (peak * 1e12) if peak else None
        shown = f"{mfu:.1%} of {peak:.0f} TFLOP/s" if mfu is not None else "n/a"
        report(
            speed > 0,
            f"dense bf16 training ({'FSDP2, 1 process' if shard == 'fsdp' else 'plain'})",
            f"{speed:,.0f} tokens/s, MFU {shown} ({name})",
            tokens_per_s=speed,
            mfu=mfu,
            device=name,
        )


@part("MoE experts: grouped_mm vs eager")
def check_moe(seed: Path, size: dict, device: str, work: Path) -> Path:
    from moekit.config import MixConfig, UpcycleSettings
    from moekit.steps.mix import mix

    moe = mix(MixConfig(out=work / "moe", seed=str(seed), upcycle=UpcycleSettings(num_experts=4), top_k=2)).out
    speeds = {
        kind: train_steps(moe, size, device, "none", work / f"moe-{kind}", experts_implementation=kind)
        for kind in ("grouped_mm", "eager")
    }
    ratio = speeds["grouped_mm"] / speeds["eager"]
    report(
        all(v > 0 for v in speeds.values()),
        "4-expert MoE training, grouped_mm vs eager experts",
        f"{speeds['grouped_mm']:,.0f} vs {speeds['eager']:,.0f} tokens/s (x{ratio:.2f})",
        **speeds,
        ratio=ratio,
    )
    return moe


@part("centroid router and add-expert calibration")
def check_calibration(seed: Path, size: dict, device: str, work: Path) -> None:
    from moekit.config import GrowConfig, MixConfig
    from moekit.steps.branch import add_branches, branch
    from moekit.steps.mix import mix
    from moekit.steps.mix.grow import add_expert
    from moekit.tiny import domain_corpus

    data = {}
    for domain in ("code", "math", "prose"):
        data[domain] = work / f"{domain}.txt"
        data[domain].write_text(domain_corpus(domain, 600))
    run = branch(str(seed), work / "run", ["code", "math"])
    started = time.perf_counter()
    cfg = MixConfig(
        out=work / "run" / "mixed",
        seed=str(seed),
        experts=list(run.branches.items()),
        run_dir=run.run_dir,
        router="centroid",
        router_data={d: str(data[d]) for d in ("code", "math")},
        router_tokens=2048,
        router_block_size=min(256, size["seq"]),
    )
    mixed = mix(cfg)
    mixed_seconds = time.perf_counter() - started
    add_branches(str(seed), run.run_dir, ["prose"])
    started = time.perf_counter()
    grown = add_expert(
        GrowConfig(
            into=mixed.out,
            name="prose",
            branch=run.run_dir / "branches" / "prose",
            out=work / "grown",
            router_data={d: str(p) for d, p in data.items()},
            router_tokens=1024,
            router_block_size=min(256, size["seq"]),
        )
    )
    grown_seconds = time.perf_counter() - started
    ok = bool(mixed.router_stats.get("init_in_domain_top1")) and grown.experts[-1] == "prose"
    report(
        ok,
        "mix --router centroid and --add-expert on the device",
        f"mix {mixed_seconds:.1f} s, add-expert {grown_seconds:.1f} s",
        mix_s=mixed_seconds,
        add_expert_s=grown_seconds,
    )


@part("generation with and without the KV cache")
def check_generation(moe: Path, device: str) -> None:
    from moekit.config import GenerateConfig
    from moekit.steps.generate import Generator

    generator = Generator(GenerateConfig(model=str(moe), raw=True, dtype="float32", device=device))
    ids = generator.prompt_ids("def value(x): return x")
    with torch.no_grad():
        runs = [
            generator.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                do_sample=False,
                use_cache=cache,
                pad_token_id=generator.tokenizer.eos_token_id,
            )
            for cache in (True, False)
        ]
    same = torch.equal(runs[0], runs[1])
    report(
        same,
        "greedy generation, KV cache vs none (fp32)",
        f"{runs[0].shape[1] - ids.shape[1]} tokens, {'same' if same else 'different'}",
    )


@part("checkpoint resume on the device")
def check_resume(seed: Path, size: dict, device: str, work: Path) -> None:
    from moekit.config import LoopSettings
    from moekit.io.loading import load_causal_lm
    from moekit.train.engine import make_engine
    from moekit.train.loop import LoopJob, run_loop

    torch.use_deterministic_algorithms(True, warn_only=True)
    blocks = torch.randint(0, 512, (size["batch"] * 6, size["seq"]), generator=torch.Generator().manual_seed(1))
    settings = LoopSettings(
        seq_len=size["seq"],
        batch_size=size["batch"],
        max_steps=6,
        eval_every=0,
        save_every=2,
        precision="bf16",
        warmup_steps=1,
    )

    def run(name: str, crash_at: int | None, resume: bool) -> dict:
        model = load_causal_lm(seed, torch.float32)
        job = LoopJob(model, blocks, {}, settings, work / name, resume=resume, show_progress=False)
        if crash_at is not None:
            job.on_step_end = lambda step, row: (_ for _ in ()).throw(KeyboardInterrupt) if step == crash_at else None
        engine = make_engine("none", "bf16", device)
        try:
            return run_loop(job, engine).state_dict
        finally:
            engine.close()

    straight = run("straight", None, False)
    try:
        run("resumed", 5, False)
    except KeyboardInterrupt:
        pass
    resumed = run("resumed", None, True)
    differences = [float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight]
    worst = max(differences)
    report(
        worst == 0.0,
        "checkpoint saved at step 4, resumed",
        f"max |difference| to an uninterrupted run {worst:.3g}",
        max_difference=worst,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), default=None, help="default: gpu on a GPU, tiny on a CPU")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = SIZES[args.size or ("gpu" if args.device.startswith("cuda") else "tiny")]
    os.environ["MOEKIT_DEVICE"] = args.device  # the steps called without a device take this one
    from moekit.progress import quiet_transformers

    quiet_transformers()
    print(
        f"moekit device check on {args.device} ({peak_tflops(torch.device(args.device))[1]}), torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed = build_seed(work, size)
        check_dense(seed, size, args.device, work)
        moe = check_moe(seed, size, args.device, work)
        check_calibration(seed, size, args.device, work)
        if moe is not None:
            check_generation(moe, args.device)
        check_resume(seed, size, args.device, work)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "results": RESULTS}, indent=1))
    failed = sum(not r["pass"] for r in RESULTS)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main())
