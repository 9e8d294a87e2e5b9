"""Checkpoints and jobs a user did not make: crafted files run no code, damage falls back, one job per output.

Each test starts from a run interrupted after step 5 with checkpoints at steps 2 and 4 (kept: 2),
breaks or crafts something, and resumes through the real CLI.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.io.checkpoint import Checkpoint
from moekit.tiny import domain_corpus

TRAIN = [
    "--branch",
    "code",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--eval-every",
    "0",
    "--max-steps",
    "6",
]
CHECKPOINTED = [*TRAIN, "--save-every", "2", "--keep-checkpoints", "2"]


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def interrupted(run_loop_module, monkeypatch, *args, at: int = 5):
    """Run the CLI with the step module's run_loop raising KeyboardInterrupt after step ``at``."""
    real = run_loop_module.run_loop

    def crashing(job, engine):
        def crash(step, row):
            if step == at:
                raise KeyboardInterrupt

        job.on_step_end = crash
        return real(job, engine)

    monkeypatch.setattr(run_loop_module, "run_loop", crashing)
    try:
        return cli(*args)
    finally:
        monkeypatch.setattr(run_loop_module, "run_loop", real)


class Exploit:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_seed) -> dict[str, Path]:
    """A seed, data, a straight-trained copy of a run and an interrupted one (checkpoints step-2 and step-4)."""
    import moekit.steps.train as train_step

    root = tmp_path_factory.mktemp("untrusted")
    seed = make_seed("llama", root / "seed")
    data = root / "code.txt"
    data.write_text(domain_corpus("code", 300))
    assert cli("branch", seed, root / "straight", "--domain", "code", "--copy").exit_code == 0
    shutil.copytree(root / "straight", root / "crashed", symlinks=True)
    assert cli("train", root / "straight", "--data", data, *TRAIN).exit_code == 0
    monkeypatch = pytest.MonkeyPatch()
    result = interrupted(train_step, monkeypatch, "train", root / "crashed", "--data", data, *CHECKPOINTED)
    assert result.exit_code == 130, result.output
    checkpoints = root / "crashed" / "train" / "code" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]
    return {"root": root, "seed": seed, "data": data, "straight": root / "straight", "crashed": root / "crashed"}


@pytest.fixture()
def run(base, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(base["crashed"], target, symlinks=True)
    return target


def checkpoints(run: Path) -> Path:
    return run / "train" / "code" / "checkpoints"


def resume(run: Path, base) -> object:
    return cli("train", run, "--data", base["data"], *CHECKPOINTED, "--resume")


def same_weights(a: Path, b: Path) -> bool:
    left, right = Checkpoint(a), Checkpoint(b)
    return all(torch.allclose(left.get(n), right.get(n), atol=1e-6) for n in left.tensors)


def craft_metadata(step: Path, marker: Path) -> None:
    (step / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))


def test_a_crafted_metadata_runs_no_code_and_resume_falls_back(run, base, tmp_path):
    marker = tmp_path / "pwned"
    craft_metadata(checkpoints(run) / "step-4", marker)
    result = resume(run, base)
    assert not marker.exists()
    assert result.exit_code == 0, result.output
    assert "refused" in result.output and "resumed at step 2" in result.output
    assert same_weights(run / "branches" / "code", base["straight"] / "branches" / "code")


def test_crafted_checkpoints_only_stop_the_run(run, base, tmp_path):
    marker = tmp_path / "pwned"
    for step in ("step-2", "step-4"):
        craft_metadata(checkpoints(run) / step, marker)
    branch_before = hashlib.sha256((run / "branches" / "code" / "model.safetensors").read_bytes()).hexdigest()
    result = resume(run, base)
    assert not marker.exists()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "can be resumed from" in result.output and "refused" in result.output
    assert hashlib.sha256((run / "branches" / "code" / "model.safetensors").read_bytes()).hexdigest() == branch_before


def test_a_crafted_value_in_a_shard_runs_no_code(run, base, tmp_path):
    """The non-tensor values (optimiser hyperparameters) are read with weights_only: a crafted one is refused."""
    from moekit.train.safe_dcp import SafeLoadPlanner

    marker = tmp_path / "pwned"
    planner = SafeLoadPlanner()

    class Item:  # what DCP hands load_bytes
        class dest_index:  # noqa: N801
            fqn = "optim.param_groups.lr"

    import io

    from moekit.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="refused"):
        buffer = io.BytesIO()
        torch.save(Exploit(marker), buffer)
        buffer.seek(0)
        planner.load_bytes(Item, buffer)
    assert not marker.exists()


def _truncate(step: Path) -> None:
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _zero(step: Path) -> None:
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))


DAMAGE = {
    "truncated shard": (_truncate, "has"),
    "zeroed shard": (_zero, "loading it failed"),
    "missing shard": (lambda step: next(step.glob("*.distcp")).unlink(), "is missing"),
    "missing .metadata": (lambda step: (step / ".metadata").unlink(), "cannot be read"),
    "garbage .metadata": (lambda step: (step / ".metadata").write_bytes(b"\x80\x04garbage"), "damaged"),
    "state not JSON": (lambda step: (step / "trainer_state.json").write_text("{not json"), "trainer_state.json"),
    "state past the last step": (
        lambda step: (step / "trainer_state.json").write_text(
            (step / "trainer_state.json").read_text().replace('"step": 4', '"step": 99')
        ),
        "never writes",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(run, base, damage):
    breaks, words = DAMAGE[damage]
    breaks(checkpoints(run) / "step-4")
    result = resume(run, base)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and words in result.output and "resumed at step 2" in result.output
    assert same_weights(run / "branches" / "code", base["straight"] / "branches" / "code")


def test_an_empty_newest_checkpoint_directory_is_passed_over(run, base):
    (checkpoints(run) / "step-6").mkdir()
    result = resume(run, base)
    assert result.exit_code == 0 and "resumed at step 4" in result.output, result.output


def test_no_usable_checkpoint_stops_with_the_path_and_the_fix(run, base):
    for step in ("step-2", "step-4"):
        _truncate(checkpoints(run) / step)
    result = resume(run, base)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert str(checkpoints(run)) in " ".join(result.output.split()) and "fix:" in result.output


def test_tune_refuses_a_crafted_metadata(base, tmp_path, monkeypatch):
    import moekit.steps.tune.run as tune_step

    run = tmp_path / "run"
    shutil.copytree(base["straight"], run, symlinks=True)
    assert cli("mix", run).exit_code == 0
    tune = ["tune", run, *TRAIN[2:], "--save-every", "2"]
    assert interrupted(tune_step, monkeypatch, *tune).exit_code == 130
    marker = tmp_path / "pwned"
    for step in (run / "tune" / "checkpoints").iterdir():
        craft_metadata(step, marker)
    result = cli(*tune, "--resume")
    assert not marker.exists()
    assert result.exit_code == 2 and "refused" in result.output and "Traceback" not in result.output, result.output


def test_a_recipe_rerun_refuses_a_crafted_metadata(base, tmp_path, monkeypatch):
    import moekit.steps.train as train_step

    recipe = tmp_path / "recipe.yaml"
    spec = {
        "name": "crafted",
        "workdir": str(tmp_path / "work"),
        "seed": {"path": str(base["seed"])},
        "domains": {"code": {"data": [str(base["data"])]}},
        "train": {"seq_len": 32, "batch_size": 4, "max_steps": 6, "save_every": 2, "eval_every": 0},
        "stages": ["branch", "train"],
    }
    recipe.write_text(yaml.safe_dump(spec))
    assert interrupted(train_step, monkeypatch, "run", recipe).exit_code == 130
    marker = tmp_path / "pwned"
    steps = list((tmp_path / "work" / "run" / "train" / "code" / "checkpoints").iterdir())
    assert steps
    for step in steps:
        craft_metadata(step, marker)
    result = cli("run", recipe)
    assert not marker.exists()
    assert result.exit_code == 2 and "refused" in result.output, result.output


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moekit.io.locks import exclusive
    with exclusive(Path(sys.argv[1]), sys.argv[2]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_a_second_job_on_a_training_branch_is_refused(run, base):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run / ".train-code.lock"), "train code"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
        result = resume(run, base)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        flat = " ".join(result.output.split())
        assert "in use by another job" in flat and f"process {holder.pid}" in flat and "started" in flat
        assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    result = resume(run, base)  # the holder died (SIGKILL): its lock is free, the job takes it
    assert result.exit_code == 0 and "resumed at step 4" in result.output, result.output
    assert not (run / ".train-code.lock").exists()


def test_two_jobs_started_together_train_the_branch_once(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["crashed"], run, symlinks=True)
    shutil.rmtree(run / "train")
    command = [sys.executable, "-m", "moekit", "train", str(run), "--data", str(base["data"]), *map(str, TRAIN)]
    jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    codes = sorted(job.returncode for job in jobs)
    assert codes == [0, 2], outputs
    assert any("in use by another job" in " ".join(o.split()) for o in outputs)
    trainings = [s for s in yaml.safe_load((run / "moekit.yaml").read_text())["stages"] if s["stage"] == "train"]
    assert len(trainings) == 1


def test_a_dotted_name_cannot_reach_through_the_metadata_module(tmp_path):
    """A protocol-4 pickle may name 'os.system' inside an allowed module; the unpickler admits exact names only."""
    from moekit.errors import CorruptCheckpointError
    from moekit.train.safe_dcp import read_metadata

    marker = tmp_path / "pwned"
    module, name = b"torch.distributed.checkpoint.metadata", b"os.system"
    command = f"touch {marker}".encode()

    def unicode(text: bytes) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text

    payload = (
        b"\x80\x04" + unicode(module) + unicode(name) + b"\x93" + unicode(command) + b"\x85R."
    )  # call, tuple1, reduce
    step = tmp_path / "step-2"
    step.mkdir()
    (step / ".metadata").write_bytes(payload)
    with pytest.raises(CorruptCheckpointError, match="refused"):
        read_metadata(step)
    assert not marker.exists()


def test_replacing_a_run_waits_for_its_jobs(run, base):
    """branch --force (and a recipe's re-branch) refuse a run whose branch a live job is training."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run / ".train-code.lock"), "train code"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("branch", base["seed"], run, "--domain", "code", "--force")
        assert result.exit_code == 2 and "in use by another job" in " ".join(result.output.split()), result.output
        assert (run / "train" / "code" / "checkpoints" / "step-4").is_dir()  # the run is untouched
    finally:
        holder.kill()
        holder.wait()


def test_two_tunes_of_one_output_share_one_lock(tmp_path):
    from moekit.config import LoopSettings, TuneConfig
    from moekit.steps.tune.inputs import lock_path

    loop = LoopSettings(max_steps=1)
    run_tune = TuneConfig(
        model=tmp_path / "run" / "mixed",
        out=tmp_path / "run" / "tuned",
        run_dir=tmp_path / "run",
        data={"code": ["x"]},
        loop=loop,
    )
    plain_tune = TuneConfig(
        model=tmp_path / "run" / "mixed", out=tmp_path / "run" / ".." / "run" / "tuned", data={"code": ["x"]}, loop=loop
    )
    assert lock_path(run_tune) == lock_path(plain_tune) == (tmp_path / "run" / ".tuned.lock").resolve()
