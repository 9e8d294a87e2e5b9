"""The one training loop, shared by ``train`` (branches), ``tune`` (mixed MoEs) and seed pretraining.

It runs as a plain single process, and under ``torchrun``/``accelerate launch`` as DDP or, with
``--shard fsdp``, as FSDP2 (``moekit.distributed``). Gradient accumulation skips the gradient
sync on inner micro-batches; checkpoints are DCP checkpoints that resume on any number of
processes. Data order and learning rate are functions of the step (``moekit.train_state``), so a
resumed run continues exactly, and N processes with a per-process batch of B/N see the same
global batches as one process with batch B.

Precision: fp32 on CPU (bf16 autocast made CPU backward passes ~14x slower, REFERENCE.md 6);
``auto`` picks bf16 mixed precision on GPUs that support it. Master weights stay fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moekit.config import LoopSettings
from moekit.data.blocks import BlockSource, TensorBlocks
from moekit.distributed import Engine, make_engine
from moekit.errors import MoekitError, NonFiniteError
from moekit.evaluation import block_losses
from moekit.io.atomic import writing
from moekit.train_state import (
    STATE_FILE,
    BlockSchedule,
    MetricsLogger,
    latest_checkpoint,
    learning_rate,
    prune_checkpoints,
    read_state,
    total_steps,
)

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
# Settings that do not change the trajectory, so a resume may change them.
# (batch_size and grad_accum may change as long as the global batch stays: it is checked on its own,
# and any split of it into processes x micro-batches x accumulation gives the same batches)
_RESUMABLE_CHANGES = {"eval_every", "eval_blocks", "save_every", "keep_checkpoints", "report_to", "precision", "save_dtype",
                      "batch_size", "grad_accum", "shard"}


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


def make_loop_engine(settings: LoopSettings) -> Engine:
    """The engine for the settings' shard mode and precision (process group from the launcher's environment)."""
    return make_engine(settings.shard, settings.precision)


def _fingerprint(settings: LoopSettings, blocks: BlockSource, world: int, precision: str) -> dict[str, Any]:
    """What must not change between a run and its resume (the step budget too: it shapes the LR).

    The data is identified by the blocks' fingerprint (store keys, token range, block size,
    mixture shares), which comes from metadata: no token is read for it.
    """
    kept = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _RESUMABLE_CHANGES}
    return {"settings": kept, "data": blocks.fingerprint(), "global_batch_blocks": settings.batch_size * settings.grad_accum * world, "precision": precision}


def select_trainable(model: torch.nn.Module, trainable: Callable[[str], bool]) -> None:
    """Set ``requires_grad`` by parameter name (names of the unwrapped model); MoekitError if nothing trains."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
    if not any(p.requires_grad for p in model.parameters()):
        raise MoekitError("Nothing to train: no parameter is selected as trainable.")


def _optimizer(model: torch.nn.Module, settings: LoopSettings, undecayed: frozenset[int] = frozenset()) -> torch.optim.Optimizer:
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


def evaluate(model: torch.nn.Module, eval_sets: dict[str, torch.Tensor], settings: LoopSettings, engine: Engine) -> dict[str, float]:
    """Mean held-out loss per domain over the first ``eval_blocks`` blocks, split across ranks.

    Every rank runs the same number of forward passes (FSDP needs that): ranks with fewer real
    blocks re-run one and give it weight 0.
    """
    world, rank = engine.world, engine.rank
    results = {}
    model.eval()
    with torch.no_grad():
        for domain, blocks in eval_sets.items():
            blocks = blocks[: settings.eval_blocks]
            positions = torch.arange(rank, -(-len(blocks) // world) * world, world)
            weights = (positions < len(blocks)).float()
            totals = torch.zeros(2, device=engine.device)
            for index, weight in zip(positions.split(settings.batch_size), weights.split(settings.batch_size)):
                ids = blocks[index % len(blocks)].long().to(engine.device)
                with engine.autocast():
                    losses = block_losses(model, ids)
                totals += torch.stack([(losses * weight.to(losses.device)).sum(), weight.sum().to(losses.device)])
            totals = engine.sum(totals)
            results[domain] = float(totals[0] / totals[1])
    model.train()
    return results


def round_to_saved_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter to ``dtype`` and back, in place.

    Training keeps fp32 master weights; the model is saved in ``dtype`` (often bf16). Rounding
    before the final evaluation makes the reported held-out loss that of the weights as saved
    (and the later cast to ``dtype`` exact). Works on plain, DDP and FSDP2 (DTensor) parameters.
    Parameters the family keeps in fp32 (routers of GLM-4.5, ERNIE 4.5) are saved in fp32 and not rounded.
    """
    from moekit.steps.model_io import kept_in_fp32

    fp32 = kept_in_fp32(getattr(model, "module", model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != dtype and not fp32(name.removeprefix("module.")):
                param.copy_(param.to(dtype))


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


def _save_checkpoint(engine: Engine, model: torch.nn.Module, optimizer: Any, checkpoint_dir: Path, step: int, tokens: int,
                     fingerprint: dict, keep: int) -> None:
    """Write a DCP checkpoint atomically: a hidden directory, renamed once every process has written its shards."""
    import shutil

    staging, final = checkpoint_dir / f".step-{step}", checkpoint_dir / f"step-{step}"
    if engine.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    engine.wait_for_everyone()
    try:
        with writing(staging, f"checkpoint {final}"):
            engine.save_checkpoint(staging, model, optimizer)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an incomplete checkpoint is never resumed from, but takes space
        raise
    engine.wait_for_everyone()
    if engine.is_main_process:
        state = {"step": step, "tokens": tokens, "world_size": engine.world, "shard": engine.shard, **fingerprint}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        prune_checkpoints(checkpoint_dir, keep)
    engine.wait_for_everyone()


def _resume_point(job: LoopJob, engine: Engine, model: torch.nn.Module, optimizer: Any, fingerprint: dict) -> tuple[int, int]:
    """Load the newest checkpoint when resuming; return (step, tokens) to start from."""
    checkpoint_dir = job.work_dir / "checkpoints"
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir.exists() else None
    if latest is None:
        return 0, 0
    if not job.resume:
        raise MoekitError(
            f"{checkpoint_dir} holds checkpoints of an earlier, unfinished run (newest: {latest.name}).",
            "Pass --resume to continue it, or delete that directory to start over.",
        )
    state = read_state(latest)
    differences = [k for k in fingerprint if state.get(k) != fingerprint[k]]
    if differences:
        raise MoekitError(
            f"Cannot resume from {latest}: it was made with different {', '.join(differences)}.",
            "Resume with the same data, batch and optimiser options, or delete the checkpoints to start over.",
        )
    engine.load_checkpoint(latest, model, optimizer)
    return int(state["step"]), int(state["tokens"])


def run_loop(job: LoopJob, engine: Engine) -> LoopResult:
    """Train ``job.model`` in place; return the final step, tokens, metrics and (rank 0) the full weights."""
    from moekit.progress import training_progress

    settings, blocks = job.settings, job.train_blocks
    world, rank = engine.world, engine.rank
    tokens_per_step = settings.batch_size * settings.grad_accum * world * blocks.block_size
    steps = total_steps(settings, tokens_per_step)
    use_cache = job.model.config.use_cache
    if settings.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable; use whichever the model has
        enable = getattr(job.model, "activation_checkpointing_enable", None) or job.model.gradient_checkpointing_enable
        enable()
        job.model.config.use_cache = False  # restored below, so the saved config is unchanged
    select_trainable(job.model, job.trainable)
    undecayed = frozenset(id(p) for n, p in job.model.named_parameters() if job.no_decay(n))
    model = engine.prepare(job.model)
    optimizer = _optimizer(model, settings, undecayed)  # after sharding: it holds the sharded parameters
    fingerprint = {**_fingerprint(settings, blocks, world, engine.precision), **job.fingerprint_extra}
    start_step, tokens = _resume_point(job, engine, model, optimizer, fingerprint)
    schedule = BlockSchedule(len(blocks), settings.batch_size, settings.grad_accum, world, settings.seed)
    logger = MetricsLogger(job.work_dir, engine.is_main_process, settings.report_to, start_step)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    row: dict[str, Any] = {}
    model.train()
    with training_progress(job.description, steps, start_step, job.show_progress and engine.is_main_process) as progress:
        for step in range(start_step, steps):
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings, steps)
            if job.on_step_start is not None:
                job.on_step_start(step, steps)
            loss_sum, extras = torch.zeros((), device=engine.device), {}
            for micro in range(settings.grad_accum):
                ids = blocks.get(schedule.indices(step, micro, rank)).to(engine.device)
                with engine.gradient_sync(model, sync=micro == settings.grad_accum - 1), engine.autocast():
                    loss, extras = job.compute_loss(model, ids)
                engine.backward(loss / settings.grad_accum)  # accumulated gradients are the global batch's mean
                loss_sum += loss.detach().float()
            grad_norm = engine.clip_grad_norm(trainable_params, settings.grad_clip, optimizer) if settings.grad_clip > 0 else None
            engine.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            tokens += tokens_per_step
            mean_loss = float(engine.mean(loss_sum / settings.grad_accum))
            seconds = time.perf_counter() - started
            row = {"step": step + 1, "loss": mean_loss, "lr": learning_rate(step, settings, steps), "tokens": tokens,
                   "tokens_per_s": tokens_per_step / seconds, **extras}
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            if job.step_metrics is not None:
                row.update(job.step_metrics())
            logger.log(row)
            check_finite(row, job.work_dir / "checkpoints")
            progress(row)
            if job.on_step_end is not None:
                job.on_step_end(step + 1, row)
            last = step + 1 == steps
            if job.eval_sets and not last and settings.eval_every and (step + 1) % settings.eval_every == 0:
                with job.eval_context():
                    losses = evaluate(model, job.eval_sets, settings, engine)
                logger.log({"step": step + 1, **{f"eval/{d}/loss": v for d, v in losses.items()}})
            if not last and settings.save_every and (step + 1) % settings.save_every == 0:
                _save_checkpoint(engine, model, optimizer, job.work_dir / "checkpoints", step + 1, tokens, fingerprint, settings.keep_checkpoints)
    if job.save_dtype is not None:
        round_to_saved_dtype(model, job.save_dtype)
    with job.eval_context():
        final_eval = evaluate(model, job.eval_sets, settings, engine) if job.eval_sets else {}
    if final_eval:
        logger.log({"step": steps, **{f"eval/{d}/loss": v for d, v in final_eval.items()}})
    logger.close()
    job.model.config.use_cache = use_cache
    engine.wait_for_everyone()
    state_dict = engine.full_state_dict(model)  # gathers FSDP shards to rank 0's CPU
    return LoopResult(steps, tokens, start_step, row, final_eval, state_dict)
