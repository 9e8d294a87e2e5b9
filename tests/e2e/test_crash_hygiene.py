"""Faults of the machine and the job: kills, divergence, full and read-only disks, leftovers, permissions."""

from __future__ import annotations

import errno
import os
import shutil
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
from moekit.commands.common import environment_failure
from moekit.io.atomic import remove_stale_temporaries
from moekit.io.checkpoint import Checkpoint
from moekit.tiny import build_tiny_model, domain_corpus

LOOP = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-blocks", "1"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _moekit(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "moekit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MOEKIT_PROGRESS_EVERY": "0", **(env or {})},
    )


def _temporaries(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture()
def run(make_seed, tmp_path) -> Path:
    seed = make_seed("llama", dest=tmp_path / "seed")
    assert cli("branch", seed, tmp_path / "run", "--domain", "code", "--domain", "math").exit_code == 0
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 300))
    return tmp_path / "run"


def test_divergence_stops_the_run_and_keeps_the_branch(run):
    branch = run / "branches" / "code"
    before = (branch / "model.safetensors").read_bytes()
    result = cli(
        "train",
        run,
        "--branch",
        "code",
        "--data",
        run.parent / "code.txt",
        "--max-steps",
        "6",
        "--lr",
        "1e30",
        "--warmup-steps",
        "0",
        "--save-every",
        "1",
        *LOOP,
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "diverged at step" in result.output and "step-1" in result.output
    assert (branch / "model.safetensors").read_bytes() == before  # nothing replaced
    assert (run / "train" / "code" / "checkpoints" / "step-1").is_dir()  # the checkpoint before it is kept


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    host = "".join(c if c.isalnum() or c in "_." else "_" for c in socket.gethostname())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".mixed.tmp-{host}-{dead.pid}-abc"
    live = tmp_path / f".mixed.tmp-{host}-{os.getppid()}-def"  # a live process (our parent)
    other_host = tmp_path / f".mixed.tmp-otherhost-{dead.pid}-ghi"
    for path in (stale, live, other_host):
        path.mkdir()
    assert remove_stale_temporaries(tmp_path, "mixed") == [stale]
    assert live.is_dir() and other_host.is_dir() and not stale.exists()


def _big_seed(tmp_path: Path) -> Path:
    """A seed whose mix writes ~100 MB, so a kill lands while the output is being written."""
    return build_tiny_model(
        tmp_path / "big-seed",
        "llama",
        hidden_size=256,
        intermediate_size=4096,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mix_leaves_nothing_after_the_next_run(sig, tmp_path):
    seed = _big_seed(tmp_path)
    args = ("mix", "--upcycle", seed, "--experts", "8", "--out", tmp_path / "moe")
    process = _moekit(*args)
    deadline = time.monotonic() + 120
    while not _temporaries(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    if process.returncode == 0:
        pytest.skip("mix finished before the signal arrived")
    assert not (tmp_path / "moe").exists()
    if sig == signal.SIGTERM:
        assert process.returncode == 143 and "Terminated (SIGTERM)" in output and not _temporaries(tmp_path)
    again = _moekit(*args)
    assert again.wait(timeout=300) == 0
    assert not _temporaries(tmp_path)  # the killed run's temporary directory is gone too
    assert (tmp_path / "moe" / "config.json").is_file()


@pytest.mark.parametrize(
    "command", [pytest.param("train", marks=pytest.mark.slow), "tune"]
)  # train: also test_demo's kill-in-train
def test_sigkill_then_resume(command, run):
    data = ["--data", f"code={run.parent / 'code.txt'}", "--data", f"math={run.parent / 'math.txt'}"]
    if command == "tune":
        assert cli("train", run, *data, "--max-steps", "1", *LOOP).exit_code == 0
        assert cli("mix", run).exit_code == 0
        data = []
    args = (command, run, *data, "--max-steps", "30", "--save-every", "2", *LOOP)
    process = _moekit(*args)
    checkpoints = run / ("tune" if command == "tune" else "train/code") / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints / "step-2").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = _moekit(*args, "--resume")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resumed at step" in output
    assert not _temporaries(run) and not _temporaries(run / "branches")
    assert not checkpoints.exists()  # removed once the result is written


def test_outputs_are_readable_as_the_umask_allows(run):
    previous = os.umask(0o022)
    try:
        assert cli("mix", run).exit_code == 0
    finally:
        os.umask(previous)
    assert (run / "mixed").stat().st_mode & 0o777 == 0o755
    assert (run / "moekit.yaml").stat().st_mode & 0o777 == 0o644


def test_paths_with_brackets_are_paths_not_globs(run):
    data = run.parent / "code[v2].txt"
    shutil.copy(run.parent / "code.txt", data)
    result = cli("train", run, "--branch", "code", "--data", data, "--max-steps", "1", *LOOP)
    assert result.exit_code == 0, result.output
    missing = cli("train", run, "--branch", "code", "--data", run.parent / "math[v3].txt", "--max-steps", "1", *LOOP)
    assert missing.exit_code == 2 and "math[v3].txt" in missing.output  # the name is shown, brackets included


def test_refused_data_leaves_no_token_cache(run):
    (run.parent / "tiny.txt").write_text("x = 1\n")
    result = cli("train", run, "--branch", "code", "--data", run.parent / "tiny.txt", "--max-steps", "1", *LOOP)
    assert result.exit_code == 2 and "fewer than one block" in result.output
    cache = run / ".cache" / "tokens"
    assert not cache.exists() or not any(cache.iterdir())


def test_all_but_experts_freezes_only_the_routed_experts(run):
    """BTX's frozen-experts ablation: routers, attention, norms, embeddings and LM head learn; experts do not."""
    data = ["--data", f"code={run.parent / 'code.txt'}", "--data", f"math={run.parent / 'math.txt'}"]
    assert cli("train", run, *data, "--max-steps", "1", *LOOP).exit_code == 0
    assert cli("mix", run).exit_code == 0
    result = cli(
        "tune", run, "--train", "all-but-experts", "--max-steps", "2", "--lr", "1e-2", "--save-dtype", "float32", *LOOP
    )
    assert result.exit_code == 0, result.output
    before, after = Checkpoint(run / "mixed"), Checkpoint(run / "tuned")
    changed = {n for n in before.tensors if not torch.equal(before.get(n).float(), after.get(n).float())}
    experts = {n for n in before.tensors if ".experts." in n}
    assert not changed & experts
    assert {n for n in before.tensors if n not in experts} == changed  # everything else learned


def test_environment_failures_are_named():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    assert "disk is full" in environment_failure(full)[0] and "/data/out" in environment_failure(full)[0]
    wrapped = RuntimeError(
        "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
    )
    assert "disk is full" in environment_failure(wrapped)[0]
    assert "read-only" in environment_failure(OSError(errno.EROFS, "Read-only file system", "/ro"))[0]
    assert environment_failure(ValueError("a bug")) is None


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=4m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: files the test process still holds


def test_full_disk_is_refused_before_mixing(run, small_disk):
    seed = _big_seed(run.parent)
    result = cli("mix", "--upcycle", seed, "--experts", "4", "--out", small_disk / "moe")
    assert result.exit_code == 2 and "Not enough disk space" in result.output and "Traceback" not in result.output
    assert not list(small_disk.iterdir())


def test_disk_filling_up_during_training_is_named(run, small_disk):
    """The run directory on a nearly full disk: the checkpoint write fails; the message says the disk is full."""
    moved = small_disk / "run"
    shutil.copytree(run, moved)
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 300_000))
    result = cli(
        "train",
        moved,
        "--branch",
        "code",
        "--data",
        run.parent / "code.txt",
        "--max-steps",
        "4",
        "--save-every",
        "1",
        *LOOP,
    )
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "disk is full" in result.output or "Not enough disk space" in result.output
    assert Checkpoint(moved / "branches" / "code").tensors  # the branch is intact


def test_read_only_location_is_refused_before_work(run, tmp_path):
    readonly = tmp_path / "ro"
    if not _mount_tmpfs(readonly, "ro,size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        result = cli("mix", run, "--out", readonly / "moe")
        assert result.exit_code == 2 and "not writable" in result.output and "Traceback" not in result.output
    finally:
        subprocess.run(["umount", "-l", str(readonly)], capture_output=True)
