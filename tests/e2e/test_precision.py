"""Mixed precision and device choice, on the CPU: bf16 autocast, FSDP2's bf16 policy under torchrun + gloo, --device.

A CPU has no fast bf16, but bf16 still runs there (autocast, or FSDP2's MixedPrecisionPolicy with
gloo collectives): these tests run the very code paths a GPU run takes, so the first GPU run is
not the first run of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import LoopSettings
from moekit.devices import choose_device
from moekit.errors import InvalidOptionError
from moekit.tiny import build_tiny_model, domain_corpus
from moekit.train.engine import make_engine
from moekit.train.loop import LoopJob, run_loop

LOOP = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--eval-every", "0", "--eval-blocks", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _dtypes_seen(precision: str, shard: str, tmp_path) -> tuple[set, set]:
    """(weight dtypes, output dtypes) of the first MLP projection during training steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", "llama"), dtype=torch.float32)
    weights, outputs = set(), set()
    projection = model.model.layers[0].mlp.down_proj

    def seen(module, args, out) -> None:  # returns None: the output is left as it is
        weights.add(module.weight.dtype)
        outputs.add(out.dtype)

    projection.register_forward_hook(seen)
    blocks = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    settings = LoopSettings(
        seq_len=32, batch_size=4, max_steps=2, eval_every=0, save_every=0, precision=precision, shard=shard
    )
    engine = make_engine(shard, precision, "cpu")
    try:
        run_loop(LoopJob(model, blocks, {}, settings, tmp_path / "work", show_progress=False), engine)
    finally:
        engine.close()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    return weights, outputs


def test_bf16_autocast_runs_on_a_cpu(tmp_path):
    weights, outputs = _dtypes_seen("bf16", "none", tmp_path)
    assert weights == {torch.float32} and outputs == {torch.bfloat16}  # autocast: fp32 weights, bf16 matmuls


def test_fsdp2_bf16_policy_casts_parameters(tmp_path):
    weights, outputs = _dtypes_seen("bf16", "fsdp", tmp_path)
    assert weights == {torch.bfloat16} and outputs == {torch.bfloat16}  # the policy gathers bf16 parameters


def test_fp32_stays_fp32(tmp_path):
    assert _dtypes_seen("fp32", "none", tmp_path) == ({torch.float32}, {torch.float32})


@pytest.fixture()
def run(make_seed, tmp_path):
    seed = make_seed("llama")
    (tmp_path / "code.txt").write_text(domain_corpus("code", 300))
    (tmp_path / "math.txt").write_text(domain_corpus("math", 300))
    assert cli("branch", seed, tmp_path / "run", "--domain", "code", "--domain", "math", "--copy").exit_code == 0
    return tmp_path


def _losses(path) -> list[float]:
    return [row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def test_train_and_tune_with_bf16_on_a_cpu(run):
    data = ["--data", f"code={run / 'code.txt'}", "--data", f"math={run / 'math.txt'}"]
    shutil.copytree(run / "run", run / "fp32", symlinks=True)
    result = cli("train", run / "run", *data, *LOOP, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert cli("train", run / "fp32", *data, *LOOP, "--precision", "fp32").exit_code == 0
    bf16, fp32 = (
        _losses(run / "run" / "train" / "code" / "metrics.jsonl"),
        _losses(run / "fp32" / "train" / "code" / "metrics.jsonl"),
    )
    assert bf16 != fp32 and max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.05  # bf16 took effect, and stays close
    assert cli("mix", run / "run").exit_code == 0
    tuned = cli("tune", run / "run", *LOOP, "--precision", "bf16")
    assert tuned.exit_code == 0, tuned.output
    from moekit.io.checkpoint import Checkpoint

    assert Checkpoint(run / "run" / "tuned").dtype() == torch.float32  # saved in the input's dtype


def test_fsdp2_bf16_under_torchrun_and_gloo_matches_one_process(run):
    """gloo reduces and gathers bf16 (torch 2.13): FSDP2's bf16 policy runs on 2 CPU processes like on 1."""
    for name in ("one", "two"):
        shutil.copytree(run / "run", run / name, symlinks=True)
    common = [
        "train",
        "--data",
        f"code={run / 'code.txt'}",
        "--branch",
        "code",
        *LOOP,
        "--shard",
        "fsdp",
        "--precision",
        "bf16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEKIT_PROGRESS_EVERY": "0"}
    for name, launcher in (
        ("one", [sys.executable, "-m", "moekit"]),
        (
            "two",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(_free_port()),
                "-m",
                "moekit",
            ],
        ),
    ):
        command = [*launcher, common[0], str(run / name), *map(str, common[1:])]
        if name == "two":
            command[command.index("--batch-size") + 1] = "2"  # 2 processes x 2 blocks: the same global batch as 1 x 4
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = (_losses(run / n / "train" / "code" / "metrics.jsonl") for n in ("one", "two"))
    assert len(one) == len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) < 1e-2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fp16_on_a_cpu_is_refused(run):
    result = cli(
        "train", run / "run", "--data", f"code={run / 'code.txt'}", "--branch", "code", *LOOP, "--precision", "fp16"
    )
    assert result.exit_code == 2 and "needs a GPU" in result.output and "Traceback" not in result.output
    assert not (run / "run" / "train").exists()


def test_device_choice(monkeypatch):
    monkeypatch.delenv("MOEKIT_DEVICE", raising=False)
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("MOEKIT_DEVICE", "cpu")
    assert choose_device() == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidOptionError, match="sees no GPU"):
            choose_device("cuda")
    with pytest.raises(InvalidOptionError, match="not a device"):
        choose_device("gpu0")


def test_an_unavailable_device_is_refused_by_the_commands(run):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli("eval", run / "run" / "branches" / "code", "--data", f"code={run / 'code.txt'}", "--device", "cuda")
    assert result.exit_code == 2 and "sees no GPU" in result.output
