"""The one training loop, shared by ``train`` (branches), ``tune`` (mixed MoEs) and seed pretraining.

It runs as a plain single process, and under ``torchrun``/``accelerate launch`` as DDP or, with
``--shard fsdp``, as FSDP2 (``moekit.train.engine``). Gradient accumulation skips the gradient
sync on inner micro-batches; checkpoints are DCP checkpoints that resume on any number of
processes. Data order and learning rate are functions of the step (``moekit.train.schedule``), so a
resumed run continues exactly, and N processes with a per-process batch of B/N see the same
global batches as one process with batch B.

Precision: fp32 on CPU (bf16 autocast made CPU backward passes ~14x slower, docs/reference.md §6);
``auto`` picks bf16 mixed precision on GPUs that support it. Master weights stay fp32.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.blocks import TensorBlocks
from moekit.errors import MoekitError, NonFiniteError
from moekit.models import check_token_ids
from moekit.train.checkpoints import latest_checkpoint, resume_point, run_fingerprint, save_checkpoint
from moekit.train.engine import Engine, make_engine
from moekit.train.evaluation import evaluate
from moekit.train.metrics import MetricsLogger
from moekit.train.preempt import stop_requested, stopped
from moekit.train.saving import round_to_saved_dtype
from moekit.train.schedule import BlockSchedule, learning_rate, total_steps

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy of a batch of packed blocks (no padding, so no mask)."""
    return model(input_ids=input_ids, labels=input_ids).loss, {}


@dataclass
class LoopJob:
    """Everything one training run needs."""

    model: torch.nn.Module
    train_blocks: Any  # a BlockSource read on demand (a store view, a mixture) or TensorBlocks for small data
    eval_sets: dict[str, torch.Tensor]
    settings: LoopSettings
    work_dir: Path
    resume: bool = False
    description: str = "training"
    show_progress: bool = True
    compute_loss: LossFn = causal_lm_loss
    trainable: Callable[[str], bool] = lambda name: True
    on_step_end: Callable[[int, dict[str, Any]], None] | None = None
    on_step_start: Callable[[int, int], None] | None = None  # (step, total steps), before the step's forward passes
    step_metrics: Callable[[], dict[str, Any]] | None = None  # called on every rank after each step
    fingerprint_extra: dict[str, Any] = field(default_factory=dict)  # caller options a resume must match
    eval_context: Callable[[], Any] = contextlib.nullcontext  # e.g. restore the model's own routing
    save_dtype: torch.dtype | None = None  # weights are rounded to this before the final evaluation
    no_decay: Callable[[str], bool] = lambda name: False  # parameters (by name) that weight decay must not touch

    def __post_init__(self) -> None:
        if isinstance(self.train_blocks, torch.Tensor):  # small in-memory data (tests, benchmarks)
            self.train_blocks = TensorBlocks(self.train_blocks)


@dataclass
class LoopResult:
    """How a run ended."""

    steps: int
    tokens: int
    resumed_from: int
    last_row: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None  # full weights, on the main process


def is_main_process() -> bool:
    """Whether this is rank 0 of a launch (or a plain single process), from the launcher's env."""
    return int(os.environ.get("RANK", "0")) == 0


def make_loop_engine(settings: LoopSettings, device: str | None = None) -> Engine:
    """The engine for the settings' shard mode and precision on ``device`` (default: this rank's GPU, else the CPU;
    process group from the launcher's environment)."""
    return make_engine(settings.shard, settings.precision, device)


def select_trainable(model: torch.nn.Module, trainable: Callable[[str], bool]) -> None:
    """Set ``requires_grad`` by parameter name (names of the unwrapped model); MoekitError if nothing trains."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise MoekitError("Nothing to train: no parameter is selected as trainable.")


def _optimizer(
    model: torch.nn.Module, settings: LoopSettings, undecayed: frozenset[int] = frozenset()
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on vectors (norms, biases), as usual for transformers,
    nor on the parameters whose ids are in ``undecayed``."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in undecayed]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in undecayed]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (settings.adam_beta1, settings.adam_beta2)
    if not any(isinstance(p, DTensor) for p in params):
        try:  # the fused kernel (CPU and CUDA) does the whole update in one pass over the parameters
            return torch.optim.AdamW(groups, lr=settings.lr, betas=betas, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=settings.lr, betas=betas)  # sharded (DTensor) parameters: the foreach kernel


def check_finite(row: dict[str, Any], checkpoint_dir: Path) -> None:
    """Stop a run whose loss or gradient norm is not finite (every rank sees the same reduced values).

    The weights are already poisoned by that step's update, so nothing of the run is saved; the
    checkpoints written before it are kept.
    """
    bad = {k: row[k] for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])}
    if not bad:
        return
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir.exists() else None
    kept = f"The checkpoint written before it, {latest}, is kept" if latest else "No checkpoint was written before it"
    raise NonFiniteError(
        f"Training diverged at step {row['step']}: {', '.join(f'{k} is {v}' for k, v in bad.items())}. "
        f"Nothing of this run was saved; the model directory is unchanged. {kept}.",
        "Lower --lr (or raise --warmup-steps), check the data, and start again: delete the checkpoints directory, "
        "since --resume continues only with the same settings.",
    )


@dataclass
class _Run:
    """The prepared pieces of one run that every step uses."""

    model: torch.nn.Module  # wrapped for the engine (DDP, FSDP2) or the job's model itself
    optimizer: torch.optim.Optimizer
    schedule: BlockSchedule
    steps: int
    tokens_per_step: int
    fingerprint: dict[str, Any]
    trainable: list[torch.nn.Parameter]  # what gradient clipping sees
    vocabulary: int  # token ids the model embeds


def _prepare(job: LoopJob, engine: Engine) -> _Run:
    """Trainable parameters chosen, the model wrapped for the engine, the optimiser built over what it holds."""
    settings, blocks = job.settings, job.train_blocks
    tokens_per_step = settings.batch_size * settings.grad_accum * engine.world * blocks.block_size
    if settings.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; use whichever the model has
        enable = getattr(job.model, "activation_checkpointing_enable", None) or job.model.gradient_checkpointing_enable
        enable()
        job.model.config.use_cache = False  # restored by run_loop, so the saved config is unchanged
    check_token_ids(blocks.max_token_id, job.model, "The training data")
    for domain, held in job.eval_sets.items():
        check_token_ids(int(held.max()) if held.numel() else -1, job.model, f"The held-out data of {domain}")
    select_trainable(job.model, job.trainable)
    undecayed = frozenset(id(p) for n, p in job.model.named_parameters() if job.no_decay(n))
    model = engine.prepare(job.model)
    optimizer = _optimizer(model, settings, undecayed)  # after sharding: it holds the sharded parameters
    schedule = BlockSchedule(len(blocks), settings.batch_size, settings.grad_accum, engine.world, settings.seed)
    fingerprint = {**run_fingerprint(settings, blocks, engine.world, engine.precision), **job.fingerprint_extra}
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocabulary = job.model.get_input_embeddings().num_embeddings
    steps = total_steps(settings, tokens_per_step)
    return _Run(model, optimizer, schedule, steps, tokens_per_step, fingerprint, trainable, vocabulary)


def _train_step(job: LoopJob, engine: Engine, run: _Run, step: int, tokens: int) -> dict[str, Any]:
    """One optimiser step over the global batch; return its metrics row (``tokens``: trained on after it)."""
    settings = job.settings
    started = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(step, settings, run.steps)
    if job.on_step_start is not None:
        job.on_step_start(step, run.steps)
    loss_sum, extras = torch.zeros((), device=engine.device), {}
    for micro in range(settings.grad_accum):
        ids = job.train_blocks.get(run.schedule.indices(step, micro, engine.rank))
        if int(ids.max()) >= run.vocabulary:  # a damaged store: one max per micro-batch, before the embedding sees it
            check_token_ids(int(ids.max()), job.model, f"The training data (step {step + 1})")
        ids = ids.to(engine.device)
        with engine.gradient_sync(run.model, sync=micro == settings.grad_accum - 1), engine.autocast():
            loss, extras = job.compute_loss(run.model, ids)
        engine.backward(loss / settings.grad_accum)  # accumulated gradients are the global batch's mean
        loss_sum += loss.detach().float()
    grad_norm = (
        engine.clip_grad_norm(run.trainable, settings.grad_clip, run.optimizer) if settings.grad_clip > 0 else None
    )
    engine.step(run.optimizer)
    run.optimizer.zero_grad(set_to_none=True)
    mean_loss = float(engine.mean(loss_sum / settings.grad_accum))
    seconds = time.perf_counter() - started
    row = {
        "step": step + 1,
        "loss": mean_loss,
        "lr": learning_rate(step, settings, run.steps),
        "tokens": tokens,
        "tokens_per_s": run.tokens_per_step / seconds,
        **extras,
    }
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    if job.step_metrics is not None:
        row.update(job.step_metrics())
    return row


def _evaluate_logged(
    job: LoopJob, engine: Engine, model: torch.nn.Module, logger: MetricsLogger, step: int
) -> dict[str, float]:
    """Held-out loss of every domain (in the job's evaluation context), logged at ``step``."""
    if not job.eval_sets:
        return {}
    with job.eval_context():
        losses = evaluate(model, job.eval_sets, job.settings, engine)
    logger.log({"step": step, **{f"eval/{d}/loss": v for d, v in losses.items()}})
    return losses


def run_loop(job: LoopJob, engine: Engine) -> LoopResult:
    """Train ``job.model`` in place; return the final step, tokens, metrics and (rank 0) the full weights."""
    from moekit.progress import training_progress

    settings, checkpoint_dir = job.settings, job.work_dir / "checkpoints"
    use_cache = job.model.config.use_cache
    run = _prepare(job, engine)
    start_step, tokens = resume_point(
        checkpoint_dir, job.resume, engine, run.model, run.optimizer, run.fingerprint, run.steps, run.tokens_per_step
    )
    options = {"stage": job.description, "loop": settings.model_dump(mode="json"), **job.fingerprint_extra}
    name = f"{job.description}: {job.work_dir}"
    logger = MetricsLogger(job.work_dir, engine.is_main_process, settings.report_to, start_step, name, options)
    row: dict[str, Any] = {}
    run.model.train()
    with training_progress(
        job.description, run.steps, start_step, job.show_progress and engine.is_main_process
    ) as progress:
        for step in range(start_step, run.steps):
            tokens += run.tokens_per_step
            row = _train_step(job, engine, run, step, tokens)
            logger.log(row)
            check_finite(row, checkpoint_dir)
            progress(row)
            if job.on_step_end is not None:
                job.on_step_end(step + 1, row)
            if step + 1 == run.steps:
                break
            if settings.eval_every and (step + 1) % settings.eval_every == 0:
                _evaluate_logged(job, engine, run.model, logger, step + 1)
            stop = stop_requested(engine)  # the scheduler's notice: save this step and stop, to be requeued
            if stop or (settings.save_every and (step + 1) % settings.save_every == 0):
                save_checkpoint(
                    engine, run.model, run.optimizer, checkpoint_dir, step + 1, tokens, run.fingerprint,
                    settings.keep_checkpoints,
                )  # fmt: skip
            if stop:
                raise stopped(step + 1, run.steps, checkpoint_dir)
    if job.save_dtype is not None:
        round_to_saved_dtype(run.model, job.save_dtype)
    final_eval = _evaluate_logged(job, engine, run.model, logger, run.steps)
    logger.close()
    job.model.config.use_cache = use_cache
    engine.wait_for_everyone()
    state_dict = engine.full_state_dict(run.model)  # gathers FSDP shards to rank 0's CPU
    return LoopResult(run.steps, tokens, start_step, row, final_eval, state_dict)
