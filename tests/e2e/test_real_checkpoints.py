"""What only real checkpoints and real jobs show: precision of saved weights and of statistics, logs off a terminal,
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import MixConfig, UpcycleSettings
from moekit.data.domains import recorded_heldout
from moekit.inspection.static import static_report
from moekit.io.checkpoint import Checkpoint
from moekit.manifest import load_manifest
from moekit.progress import PlainProgress
from moekit.steps.branch import branch
from moekit.steps.mix import mix
from moekit.tiny import build_tiny_model, domain_corpus
from moekit.train.evaluation import block_losses
from tests.formats import stored_float_dtypes

LOOP = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-blocks", "4", "--save-every", "0"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture()
def bf16_run(make_seed, tmp_path) -> Path:
    """A run from a bf16 seed with tied embeddings (the common real seed), with code data."""
    seed = make_seed("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    branch(str(seed), tmp_path / "run", ["code"])
    (tmp_path / "code.txt").write_text(domain_corpus("code", 300))
    return tmp_path


def _saved_heldout_loss(run: Path, name: str, seq_len: int = 32, blocks: int = 4) -> float:
    """Held-out loss of the branch as saved on disk, on the blocks train evaluated."""
    branch_dir = run / "branches" / name
    tokenizer = AutoTokenizer.from_pretrained(branch_dir)
    record = load_manifest(run).branches[name]
    held = recorded_heldout(
        tokenizer, name, record.data, record.val_data, record.heldout, seq_len, "text", run / ".cache" / "tokens"
    ).head(blocks)
    model = AutoModelForCausalLM.from_pretrained(branch_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(block_losses(model, held[:blocks].long()).mean())


@pytest.mark.parametrize("save_dtype", ["auto", "float32"])
def test_reported_heldout_loss_is_the_saved_weights(save_dtype, bf16_run):
    result = cli(
        "train",
        bf16_run / "run",
        "--branch",
        "code",
        "--data",
        bf16_run / "code.txt",
        "--max-steps",
        "4",
        "--lr",
        "2e-3",
        "--save-dtype",
        save_dtype,
        *LOOP,
    )
    assert result.exit_code == 0, result.output
    expected = torch.bfloat16 if save_dtype == "auto" else torch.float32
    branch_dir = bf16_run / "run" / "branches" / "code"
    assert stored_float_dtypes(branch_dir) == {expected}
    assert json.loads((branch_dir / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    record = load_manifest(bf16_run / "run").stages[-1]
    assert record.outputs["saved_dtype"] == str(expected).removeprefix("torch.")
    assert record.outputs["eval_loss"]["code"] == pytest.approx(_saved_heldout_loss(bf16_run / "run", "code"), abs=1e-5)


def test_branches_with_a_redundant_tied_head_still_mix(bf16_run, tmp_path):
    """Branches written by moekit 0.1 from a tied bf16 seed carry an extra lm_head.weight: they mix, and the output
    is tied."""
    from safetensors.torch import load_file, save_file

    code = bf16_run / "run" / "branches" / "code"
    tensors = load_file(code / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    (code / "model.safetensors").unlink()  # never write into a file hard-linked to the seed
    save_file(tensors, code / "model.safetensors", metadata={"format": "pt"})
    result = cli("mix", bf16_run / "run")
    assert result.exit_code == 0, result.output
    assert "lm_head.weight" not in Checkpoint(bf16_run / "run" / "mixed").tensors


def test_rounded_away_updates_are_reported(bf16_run):
    """A few tiny-lr steps in bf16 leave most weights bit-identical: say so, and record the share."""
    result = cli(
        "train",
        bf16_run / "run",
        "--branch",
        "code",
        "--data",
        bf16_run / "code.txt",
        "--max-steps",
        "2",
        "--lr",
        "1e-6",
        *LOOP,
    )
    assert result.exit_code == 0, result.output
    share = load_manifest(bf16_run / "run").stages[-1].outputs["unchanged_share"]
    assert share > 0.5
    assert "bit-identical" in result.output and "--save-dtype float32" in result.output


def test_expert_similarity_tells_copies_from_slightly_trained_experts(tmp_path):
    """Upcycled experts are exact copies: cosine 1 (fp32 sums over ~3M values gave 0.9998); a 1% nudge of 1% of one
    expert's values shows."""
    seed = build_tiny_model(
        tmp_path / "seed",
        "llama",
        dtype=torch.bfloat16,
        intermediate_size=16384,
        num_hidden_layers=1,
        hidden_size=64,
        head_dim=16,
    )
    moe = mix(MixConfig(out=tmp_path / "moe", seed=str(seed), upcycle=UpcycleSettings(num_experts=3))).out
    cosine = torch.tensor(static_report(Checkpoint(moe))["per_layer"][0]["expert_cosine"], dtype=torch.float64)
    assert (cosine - 1).abs().max() < 1e-12
    from safetensors.torch import load_file, save_file

    tensors = load_file(moe / "model.safetensors")
    name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    nudged = tensors[name].float().reshape(-1)
    nudged[::100] *= 1.01  # about one bf16 step for 1% of the values: cosine drops by ~1e-6
    tensors[name] = nudged.reshape(tensors[name].shape).to(torch.bfloat16)
    (moe / "model.safetensors").unlink()
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
    layer = static_report(Checkpoint(moe))["per_layer"][0]
    assert layer["expert_cosine"][0][2] > 1 - 1e-12 and layer["expert_cosine"][0][1] < 1 - 1e-10
    assert layer["expert_drift"][1] > 0


def test_plain_progress_lines_are_rate_limited():
    times = iter([0.0, 1.0, 5.0, 31.0, 32.0, 70.0])
    lines: list[str] = []

    class Sink:
        def write(self, text: str) -> None:
            lines.extend(t for t in text.splitlines() if t)

        def flush(self) -> None:
            pass

    progress = PlainProgress("train code step", 5, interval=30.0, stream=Sink(), clock=lambda: next(times))
    for _ in range(5):
        progress.update(1, {"loss": "2.0000"})
    assert len(lines) == 3  # the first update, the one 30 s later, and the last
    assert "train code step: 1/5 (20%), loss 2.0000" in lines[0] and "ETA" in lines[0]
    assert "5/5 (100%)" in lines[-1] and "done" in lines[-1]


def _moekit(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MOEKIT_PROGRESS_EVERY": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "moekit", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_train_off_a_terminal_prints_progress_lines(bf16_run):
    process = _moekit(
        "train", str(bf16_run / "run"), "--data", f"code={bf16_run / 'code.txt'}", "--max-steps", "3", *LOOP
    )
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    steps = [line for line in output.splitlines() if "train code step:" in line]
    assert len(steps) == 3 and "loss" in steps[0] and "tok/s" in steps[0] and "ETA" in steps[0]


def test_sigterm_is_handled_like_ctrl_c(bf16_run):
    """A scheduler's SIGTERM: the interrupted message, exit 143, the branch untouched, no temporary directory left."""
    branch_dir = bf16_run / "run" / "branches" / "code"
    before = (branch_dir / "model.safetensors").read_bytes()
    process = _moekit(
        "train", str(bf16_run / "run"), "--data", f"code={bf16_run / 'code.txt'}", "--max-steps", "100000", *LOOP
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 300
    for line in process.stdout:  # wait until training runs
        if "train code step:" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=60) == 143, output
    assert "Terminated (SIGTERM)" in output and "Traceback" not in output
    assert (branch_dir / "model.safetensors").read_bytes() == before
    assert not [p for p in (bf16_run / "run" / "branches").iterdir() if p.name.startswith(".")]
