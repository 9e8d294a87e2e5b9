"""``train``: learning, exact resume, data-parallel equivalence, safe writes, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import build_app
from moekit.config import LoopSettings
from moekit.data import packed_blocks, token_stream
from moekit.io.checkpoint import Checkpoint
from moekit.io.files import sha256_files
from moekit.manifest import load_manifest
from moekit.steps.branch import branch
from moekit.tiny import domain_corpus
from moekit.train.loop import LoopJob, make_loop_engine, run_loop
from tests.conftest import assert_clean_load, load

TRAIN = ["--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "5", "--eval-blocks", "4"]


def _files_hash(model_dir: Path) -> str:
    """Hash of a model's files, but tokenizer_config.json (branches carry a portable rewrite of the seed's)."""
    return sha256_files(sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != "tokenizer_config.json"))


@pytest.fixture()
def run(make_seed, tmp_path):
    """A run with branches code and math, plus generated data files for both."""
    seed = make_seed("llama", dest=tmp_path / "seed")
    branch(str(seed), tmp_path / "run", ["code", "math"])
    for domain in ("code", "math"):
        (tmp_path / f"{domain}.txt").write_text(domain_corpus(domain, 300))
    return tmp_path


def cli(*args):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_lowers_loss_and_writes_the_branch_safely(run):
    seed_hash = _files_hash(run / "seed")
    result = cli(
        "train",
        run / "run",
        "--branch",
        "code",
        "--data",
        run / "code.txt",
        "--data",
        f"math={run / 'math.txt'}",
        "--max-steps",
        "20",
        *TRAIN,
    )
    assert result.exit_code == 0, result.output
    rows = _rows(run / "run" / "train" / "code" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) < sum(losses[:3]) - 1.0
    evals = [r for r in rows if "eval/code/loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20] and all("eval/math/loss" in r for r in evals)
    assert evals[-1]["eval/code/loss"] < evals[0]["eval/code/loss"]
    code = run / "run" / "branches" / "code"
    model, info = load(code)
    assert_clean_load(info)
    assert (code / "metrics.jsonl").is_file() and (code / "tokenizer.json").is_file()
    assert _files_hash(run / "seed") == seed_hash  # hard links shared with the seed were never written
    assert _files_hash(run / "run" / "branches" / "math") == seed_hash  # the other branch is untouched
    assert Checkpoint(code).dtype() == Checkpoint(run / "seed").dtype()
    manifest = load_manifest(run / "run")
    assert manifest.branches["code"].data == [str(run / "code.txt")]
    assert manifest.branches["math"].data == [str(run / "math.txt")]  # remembered for later
    assert manifest.stages[-1].stage == "train" and manifest.stages[-1].params["branch"] == "code"
    assert not (run / "run" / "train" / "code" / "checkpoints").exists()


def _loop_job(run: Path, work: str, **changes) -> LoopJob:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "seed")
    blocks = packed_blocks(token_stream(tokenizer, run / "code.txt"), 32, "code")
    settings = LoopSettings(seq_len=32, batch_size=2, grad_accum=2, max_steps=8, lr=3e-3, save_every=3, eval_every=0)
    model = AutoModelForCausalLM.from_pretrained(run / "seed", dtype=torch.float32)
    return LoopJob(model, blocks, {"code": blocks[:4]}, settings, run / work, show_progress=False, **changes)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(run):
    straight = _loop_job(run, "straight")
    run_loop(straight, make_loop_engine(straight.settings))

    def crash(step: int, row: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt  # stands in for a killed job; the newest checkpoint is step 3

    interrupted = _loop_job(run, "resumed", on_step_end=crash)
    with pytest.raises(KeyboardInterrupt):
        run_loop(interrupted, make_loop_engine(interrupted.settings))
    assert sorted(p.name for p in (run / "resumed" / "checkpoints").iterdir()) == ["step-3"]
    resumed = _loop_job(run, "resumed", resume=True)
    result = run_loop(resumed, make_loop_engine(resumed.settings))
    assert result.resumed_from == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    steps = lambda path: [(r["step"], round(r["loss"], 5)) for r in _rows(path) if "loss" in r]  # noqa: E731
    assert steps(run / "resumed" / "metrics.jsonl") == steps(run / "straight" / "metrics.jsonl")


def test_checkpoints_of_an_unfinished_run_need_resume(run):
    job = _loop_job(
        run, "work", on_step_end=lambda step, row: (_ for _ in ()).throw(KeyboardInterrupt) if step == 4 else None
    )
    with pytest.raises(KeyboardInterrupt):
        run_loop(job, make_loop_engine(job.settings))
    again = _loop_job(run, "work")
    from moekit.errors import MoekitError

    with pytest.raises(MoekitError, match="--resume"):
        run_loop(again, make_loop_engine(again.settings))


def test_two_processes_match_one_process_with_the_same_global_batch(run):
    shutil.copytree(run / "run", run / "run2", symlinks=True)
    common = [
        "train",
        "--branch",
        "math",
        "--data",
        str(run / "math.txt"),
        "--max-steps",
        "6",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--eval-every",
        "3",
        "--eval-blocks",
        "4",
    ]
    single = cli(common[0], run / "run", *common[1:], "--batch-size", "4")
    assert single.exit_code == 0, single.output
    accelerate = Path(sys.executable).parent / "accelerate"
    launch = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "moekit",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, common[0], str(run / "run2"), *common[1:], "--batch-size", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one, two = (_rows(run / r / "train" / "math" / "metrics.jsonl") for r in ("run", "run2"))
    assert [r["tokens"] for r in one if "loss" in r] == [r["tokens"] for r in two if "loss" in r]
    for a, b in zip(one, two):
        for key in ("loss", "eval/math/loss", "eval/code/loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), (a, b)
    weights = [Checkpoint(run / r / "branches" / "math") for r in ("run", "run2")]
    for name in weights[0].tensors:
        assert torch.allclose(weights[0].get(name), weights[1].get(name), atol=1e-5), name


def test_tokenised_data_is_cached(run, monkeypatch):
    args = ["train", run / "run", "--branch", "math", "--data", run / "math.txt", "--max-steps", "1", *TRAIN]
    assert cli(*args).exit_code == 0
    import moekit.data.store

    def no_tokenising(*_args, **_kwargs):
        raise AssertionError("tokenised again despite the cache")

    # every path from data to tokens (cached_store, prepare) goes through prepare_store
    monkeypatch.setattr(moekit.data.store, "prepare_store", no_tokenising)
    result = cli("train", run / "run", "--branch", "math", "--max-steps", "1", *TRAIN)  # data remembered
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--branch", "code", "--data", "{tmp}/nope.txt"], "does not exist"),
        (["--branch", "code", "--data", "{tmp}/short.txt", "--seq-len", "512"], "fewer than one block"),
        (["--branch", "code", "--data", "{tmp}/code.txt", "--seq-len", "4096"], "longer than the context"),
        (["--branch", "physics", "--data", "{tmp}/code.txt"], "Unknown branch 'physics'"),
        (["--branch", "code"], "has no training data"),
        (["--data", "{tmp}/code.txt"], "which branch is it for"),
        (
            ["--branch", "code", "--data", "{tmp}/code.txt", "--max-steps", "2", "--max-tokens", "9"],
            "exactly one of max_steps or max_tokens",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(run, args, message):
    (run / "short.txt").write_text("tiny")
    before = _files_hash(run / "run" / "branches" / "code")
    manifest_before = (run / "run" / "moekit.yaml").read_text()
    args = [a.replace("{tmp}", str(run)) for a in args]
    if "--max-steps" not in args:
        args += ["--max-steps", "2"]
    result = cli("train", run / "run", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ") and "Traceback" not in result.output
    assert _files_hash(run / "run" / "branches" / "code") == before
    assert (run / "run" / "moekit.yaml").read_text() == manifest_before
    assert not (run / "run" / "train").exists()


def test_newer_manifest_is_refused(run):
    path = run / "run" / "moekit.yaml"
    path.write_text(path.read_text().replace("manifest_version: 2", "manifest_version: 7"))
    result = cli("train", run / "run", "--branch", "code", "--data", run / "code.txt", "--max-steps", "1")
    assert result.exit_code == 2 and "newer moekit" in result.output


def test_tensorboard_logging(run):
    pytest.importorskip("torch.utils.tensorboard")
    result = cli(
        "train",
        run / "run",
        "--branch",
        "code",
        "--data",
        run / "code.txt",
        "--max-steps",
        "2",
        "--report-to",
        "tensorboard",
        *TRAIN,
    )
    assert result.exit_code == 0, result.output
    assert list((run / "run" / "train" / "code" / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_resume_after_a_crash_matches_an_uninterrupted_run(run, monkeypatch):
    shutil.copytree(run / "run", run / "other", symlinks=True)
    args = ["--branch", "code", "--data", run / "code.txt", "--max-steps", "6", "--save-every", "2", *TRAIN]
    assert cli("train", run / "run", *args).exit_code == 0
    import moekit.steps.train as train_step

    real_run_loop = train_step.run_loop

    def crashing_run_loop(job, engine):
        def crash(step, row):
            if step == 5:
                raise KeyboardInterrupt

        job.on_step_end = crash
        return real_run_loop(job, engine)

    monkeypatch.setattr(train_step, "run_loop", crashing_run_loop)
    crashed = cli("train", run / "other", *args)
    assert crashed.exit_code == 130 and "Interrupted" in crashed.output
    assert (run / "other" / "train" / "code" / "checkpoints" / "step-4").is_dir()
    assert _files_hash(run / "other" / "branches" / "code") == _files_hash(run / "seed")  # branch untouched
    monkeypatch.setattr(train_step, "run_loop", real_run_loop)
    resumed = cli("train", run / "other", *args, "--resume")
    assert resumed.exit_code == 0 and "resumed at step 4" in resumed.output
    done = [Checkpoint(run / r / "branches" / "code") for r in ("run", "other")]
    for name in done[0].tensors:
        assert torch.allclose(done[0].get(name), done[1].get(name), atol=1e-6), name


def test_max_tokens_and_gradient_checkpointing(run):
    args = [
        "--branch",
        "math",
        "--data",
        run / "math.txt",
        "--max-tokens",
        "300",
        "--gradient-checkpointing",
        "--grad-accum",
        "2",
        *TRAIN,
    ]
    result = cli("train", run / "run", *args)
    assert result.exit_code == 0, result.output
    rows = [r for r in _rows(run / "run" / "train" / "math" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and rows[-1]["tokens"] == 2 * 4 * 2 * 32  # ceil(300 / 256) steps of 4 x 2 x 32 tokens


def test_train_then_mix_with_a_legacy_config_seed(make_seed, tmp_path):
    """Seeds from the hub often have pre-v5 configs; a trained branch is re-saved in the v5 form."""
    seed = make_seed("llama", dest=tmp_path / "seed")
    config = json.loads((seed / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], torch_dtype=config.pop("dtype"))
    for key in ("head_dim", "attention_dropout", "mlp_bias", "pretraining_tp"):
        config.pop(key, None)
    (seed / "config.json").write_text(json.dumps(config))
    branch(str(seed), tmp_path / "run", ["code", "math"])
    (tmp_path / "code.txt").write_text(domain_corpus("code", 200))
    trained = cli(
        "train",
        tmp_path / "run",
        "--branch",
        "code",
        "--data",
        tmp_path / "code.txt",
        "--max-steps",
        "2",
        "--gradient-checkpointing",
        *TRAIN,
    )
    assert trained.exit_code == 0, trained.output
    saved = json.loads((tmp_path / "run" / "branches" / "code" / "config.json").read_text())
    assert saved != config and saved.get("use_cache", True) is True  # re-saved by transformers; use_cache restored
    mixed = cli("mix", tmp_path / "run")
    assert mixed.exit_code == 0, mixed.output
    assert_clean_load(load(tmp_path / "run" / "mixed")[1])
