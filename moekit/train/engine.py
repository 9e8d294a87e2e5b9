"""Where the training loop runs: one process, data-parallel (DDP), or sharded (FSDP2), on PyTorch's own stack.

Launch with ``torchrun`` or ``accelerate launch`` (both set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address); the engine forms the process group itself: NCCL on
GPUs, gloo on CPUs. ``--shard none`` keeps a full model per process (DDP when there are several);
``--shard fsdp`` wraps every decoder layer and then the root with ``fully_shard`` (FSDP2): each
process holds 1/N of the parameters, gradients and optimiser state, with bf16 parameters and fp32
gradient reduction on GPUs that support bf16.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP) with the model and optimiser state
dicts of ``torch.distributed.checkpoint.state_dict``: every process writes its own shards in
parallel, and a checkpoint loads on any number of processes and either shard mode (DCP reshards
on load). The final export gathers full weights to the CPU of rank 0 only.

Why not accelerate here (it launched and wrapped the loop until moekit 0.1): its FSDP plugin
does not run on a CPU at all (``DistributedType.NO`` under torchrun, each rank training alone),
its checkpoints do not reshard across world sizes, and FSDP2, DDP and DCP are a few calls each.
``accelerate launch`` still works as a launcher.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from moekit.devices import choose_device, supports_bf16
from moekit.errors import InvalidOptionError

ShardMode = Literal["none", "fsdp"]


def _resolve_precision(choice: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16; ``auto`` is bf16 on a GPU that supports it, else fp32 (CPU bf16 backward is ~14x slower).

    bf16 runs on a CPU too (autocast, or FSDP2's policy): correct, and slow. fp16 needs a GPU: it
    relies on a loss scaler that moekit runs on CUDA only.
    """
    if choice == "auto":
        return "bf16" if supports_bf16(device) else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise InvalidOptionError(
            f"--precision fp16 needs a GPU (fp16 training relies on a loss scaler); this run is on {device}.",
            "Use --precision bf16 (or fp32) on a CPU.",
        )
    return choice


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers`` in every supported family)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no model.layers to shard")
    return list(layers)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when there is no process group: that is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class Engine:
    """The process group, device, precision and shard mode of one training run."""

    shard: ShardMode = "none"
    precision: str = "fp32"
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    _scaler: Any = None

    # ----- who am I ---------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or a single process)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use."""
        return dist.is_available() and dist.is_initialized()

    def wait_for_everyone(self) -> None:
        """A barrier across processes (nothing in a single process)."""
        if self.distributed and self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. tokenises into the cache), then the others (which find it done)."""
        if not self.is_main_process:
            self.wait_for_everyone()
        yield
        if self.is_main_process:
            self.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (a copy)."""
        tensor = tensor.detach().clone().to(self.device)
        if self.distributed and self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes (a copy)."""
        return self.sum(tensor) / self.world

    # ----- the model ----------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to this process's device and wrap it for the shard mode; return what to train."""
        model.to(self.device)
        if self.shard == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if self.precision == "bf16"
                else MixedPrecisionPolicy()
            )
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            return model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        return model

    def autocast(self) -> Any:
        """Mixed-precision autocast for unsharded training, on a GPU or a CPU (FSDP2 casts through its policy
        instead)."""
        if self.shard == "fsdp" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    @contextlib.contextmanager
    def gradient_sync(self, model: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on inner micro-batches of gradient accumulation."""
        if self.shard == "fsdp":
            model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            yield
        elif not sync and hasattr(model, "no_sync"):
            with model.no_sync():  # type: ignore[operator]
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (loss-scaled for fp16)."""
        if self.precision == "fp16" and self.device.type == "cuda":
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler("cuda")
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip_grad_norm(self, parameters: Iterable[torch.nn.Parameter], max_norm: float, optimizer: Any) -> float:
        """Clip the global gradient norm (over every process's shards); return the norm before clipping."""
        from torch.distributed.tensor import DTensor

        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def step(self, optimizer: Any) -> None:
        """Optimiser step (through the loss scaler for fp16)."""
        if self._scaler is not None:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()

    # ----- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Write model and optimiser state with DCP (each process its own shards) into ``directory``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        with _single_process_quiet():
            dcp.save(
                {"model": model_state, "optim": optim_state}, checkpoint_id=str(directory), no_dist=not self.distributed
            )

    def load_checkpoint(self, directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
        """Load a DCP checkpoint written by any number of processes, in either shard mode."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_state_dict,
            set_state_dict,
        )

        from moekit.train.safe_dcp import SafeLoadPlanner, SafeReader

        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _single_process_quiet():  # read without running code from the files (moekit.train.safe_dcp)
            dcp.load(
                state, storage_reader=SafeReader(directory), planner=SafeLoadPlanner(), no_dist=not self.distributed
            )
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Full (gathered) weights on the CPU of rank 0; None on the others."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        if self.shard == "fsdp" or self.world > 1:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
            return state if self.is_main_process else None
        return {k: v for k, v in model.state_dict().items()}

    def free_memory(self) -> None:
        """Drop cached memory between runs (e.g. between branches)."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Destroy the process group if this engine made it."""
        if self.owns_group and self.distributed:
            dist.destroy_process_group()
            self.owns_group = False


def make_engine(shard: ShardMode = "none", precision: str = "auto", device: str | None = None) -> Engine:
    """The engine for this process: rank and world from the launcher's environment, the device from
    ``moekit.devices.choose_device`` (``device``, ``MOEKIT_DEVICE``, else this rank's GPU, else the CPU).

    A multi-process launch (or ``--shard fsdp`` in a single process, which FSDP2 needs) gets a
    process group (NCCL on GPUs, gloo on CPUs); one that exists already is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = choose_device(device, local_rank)
    resolved = _resolve_precision(precision, chosen)  # refuses fp16 on a CPU before any process group is made
    cuda = chosen.type == "cuda"
    if cuda:
        torch.cuda.set_device(chosen)
    owns = False
    if (world > 1 or shard == "fsdp") and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend, device_id=chosen if cuda else None)
        else:  # a one-process group, so that FSDP2 has a mesh
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    return Engine(shard, resolved, world, rank, local_rank, chosen, owns)
