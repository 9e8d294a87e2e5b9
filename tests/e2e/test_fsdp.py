"""Sharded training (FSDP2, gloo on CPU) equals one process, and checkpoints resume across world sizes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.io.checkpoint import Checkpoint
from moekit.tiny import domain_corpus

LOOP = ["--seq-len", "32", "--eval-every", "0", "--eval-blocks", "2", "--lr", "1e-3"]


def cli(*args):
    result = CliRunner().invoke(build_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, *args) -> subprocess.Popen:
    """``moekit ARGS`` under torchrun with ``processes`` processes (one plain process for 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEKIT_PROGRESS_EVERY": "0"}
    if processes == 1:
        command = [sys.executable, "-m", "moekit", *map(str, args)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
            "-m",
            "moekit",
            *map(str, args),
        ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _run(processes: int, *args) -> str:
    process = _launch(processes, *args)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return output


def _losses(work: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (work / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def _max_difference(a: Path, b: Path) -> float:
    first, second = Checkpoint(a), Checkpoint(b)
    assert set(first.tensors) == set(second.tensors)
    return max(float((first.get(n).float() - second.get(n).float()).abs().max()) for n in first.tensors)


@pytest.fixture()
def runs(make_seed, tmp_path):
    """Two identical runs (one per process count) of an fp32 seed, and code data."""
    seed = make_seed("llama")
    (tmp_path / "code.txt").write_text(domain_corpus("code", 400))
    (tmp_path / "math.txt").write_text(domain_corpus("math", 400))
    for name in ("one", "two"):
        cli("branch", seed, tmp_path / name, "--domain", "code", "--domain", "math")
    return tmp_path


def test_fsdp_on_two_processes_equals_one_process(runs):
    data = ["--data", f"code={runs / 'code.txt'}", "--branch", "code", "--max-steps", "6", *LOOP]
    _run(1, "train", runs / "one", *data, "--batch-size", "4")
    _run(2, "train", runs / "two", *data, "--batch-size", "2", "--shard", "fsdp")
    one, two = _losses(runs / "one" / "train" / "code"), _losses(runs / "two" / "train" / "code")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert _max_difference(runs / "one" / "branches" / "code", runs / "two" / "branches" / "code") < 1e-5


def test_router_only_tune_under_fsdp_equals_one_process(runs):
    """Frozen and trainable parameters in one sharded module: only the routers learn, as in one process."""
    for name in ("one", "two"):
        cli(
            "train",
            runs / name,
            "--data",
            f"code={runs / 'code.txt'}",
            "--data",
            f"math={runs / 'math.txt'}",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            *LOOP,
        )
        cli("mix", runs / name)
    # the two runs' mixed models are equal (same seed, same training): tune each, on 1 and on 2 processes
    assert _max_difference(runs / "one" / "mixed", runs / "two" / "mixed") == 0
    # global-batch balancing: the aux loss then sees the same counts however the batch is split over processes
    tune = [
        "--train",
        "router",
        "--max-steps",
        "5",
        "--lr",
        "1e-2",
        "--seq-len",
        "32",
        "--eval-every",
        "0",
        "--eval-blocks",
        "2",
        "--balance-scope",
        "global",
    ]
    _run(1, "tune", runs / "one", *tune, "--batch-size", "4")
    _run(2, "tune", runs / "two", *tune, "--batch-size", "2", "--shard", "fsdp")
    one, two = _losses(runs / "one" / "tune"), _losses(runs / "two" / "tune")
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert _max_difference(runs / "one" / "tuned", runs / "two" / "tuned") < 1e-5
    mixed, tuned = Checkpoint(runs / "two" / "mixed"), Checkpoint(runs / "two" / "tuned")
    changed = [n for n in mixed.tensors if not torch.equal(mixed.get(n), tuned.get(n))]
    assert changed and all(n.endswith("block_sparse_moe.gate.weight") for n in changed)


def test_bias_balancing_under_fsdp_equals_one_process(runs):
    """The selection bias (a DTensor shard under FSDP2) moves by the same global counts as in one process."""
    for name in ("one", "two"):
        cli(
            "train",
            runs / name,
            "--data",
            f"code={runs / 'code.txt'}",
            "--data",
            f"math={runs / 'math.txt'}",
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            *LOOP,
        )
        cli("mix", runs / name, "--target", "glm4_moe")
    tune = [
        "--train",
        "router",
        "--balance",
        "bias",
        "--bias-rate",
        "0.01",
        "--max-steps",
        "4",
        "--lr",
        "1e-2",
        "--seq-len",
        "32",
        "--eval-every",
        "0",
        "--eval-blocks",
        "2",
    ]
    _run(1, "tune", runs / "one", *tune, "--batch-size", "4")
    _run(2, "tune", runs / "two", *tune, "--batch-size", "2", "--shard", "fsdp")
    one, two = Checkpoint(runs / "one" / "tuned"), Checkpoint(runs / "two" / "tuned")
    biases = [n for n in one.tensors if n.endswith("e_score_correction_bias")]
    assert biases and all(float(one.get(n).abs().max()) > 0 for n in biases)  # the bias moved
    assert all(
        torch.equal(one.get(n), two.get(n)) for n in biases
    )  # sign steps of the same global counts: exactly equal
    assert _max_difference(runs / "one" / "tuned", runs / "two" / "tuned") < 1e-5


def _interrupt_after_checkpoint(processes: int, run: Path, args: list, extra: list) -> None:
    """Start training, and SIGKILL it (every process) once the step-20 checkpoint is complete."""
    process = _launch(processes, "train", run, *args, *extra)
    checkpoint = run / "train" / "code" / "checkpoints" / "step-20" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert checkpoint.is_file(), "the run ended before its step-20 checkpoint"


@pytest.mark.parametrize(
    "first,then", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)]
)  # 1 -> 2 with -m slow (30 s)
def test_resume_across_world_sizes(first, then, runs):
    """A checkpoint written by N processes resumes on M and ends where an uninterrupted run ends."""
    args = ["--data", f"code={runs / 'code.txt'}", "--branch", "code", "--max-steps", "60", "--save-every", "20", *LOOP]
    layout = {1: ["--batch-size", "4"], 2: ["--batch-size", "2", "--shard", "fsdp"]}
    _run(1, "train", runs / "one", *args, *layout[1])  # uninterrupted
    _interrupt_after_checkpoint(first, runs / "two", args, layout[first])
    output = _run(then, "train", runs / "two", *args, *layout[then], "--resume")
    assert "resumed at step" in output
    assert _max_difference(runs / "one" / "branches" / "code", runs / "two" / "branches" / "code") < 1e-5


def test_attention_experts_tune_under_fsdp_equals_one_process(runs):
    """moekit's own family (BAM attention experts, stacked per-expert projections) trains sharded as in one
    process."""
    data = ["--data", f"code={runs / 'code.txt'}", "--data", f"math={runs / 'math.txt'}"]
    for name in ("one", "two"):  # branches a step apart, so that experts (and their gradients) differ
        cli("train", runs / name, *data, "--max-steps", "1", "--batch-size", "4", *LOOP)
        cli("mix", runs / name, "--attention-experts", "--attention-kv", "expert")
    tune = ["--train", "router+attn", "--max-steps", "3", *LOOP]
    _run(1, "tune", runs / "one", *tune, "--batch-size", "4")
    _run(2, "tune", runs / "two", *tune, "--batch-size", "2", "--shard", "fsdp")
    one, two = _losses(runs / "one" / "tune"), _losses(runs / "two" / "tune")
    assert len(one) == len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) < 2e-4
    # Adam turns a gradient at rounding level into a full +-lr step, so a few values whose gradient is ~0 may step
    # apart under another reduction order; every other value must agree
    first, second = Checkpoint(runs / "one" / "tuned"), Checkpoint(runs / "two" / "tuned")
    apart = sum(int(((first.get(n) - second.get(n)).abs() > 1e-4).sum()) for n in first.tensors)
    assert apart <= 0.001 * sum(first.get(n).numel() for n in first.tensors), apart
    mixed, tuned = Checkpoint(runs / "two" / "mixed"), Checkpoint(runs / "two" / "tuned")
    changed = {n for n in mixed.tensors if not torch.equal(mixed.get(n), tuned.get(n))}
    assert "model.layers.0.self_attn.router.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert not any(".mlp.experts." in n for n in changed)
    assert (runs / "two" / "tuned" / "modeling_moekit_moe.py").is_file()
