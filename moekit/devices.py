"""Where moekit computes, chosen in one place: the ``--device`` option, ``MOEKIT_DEVICE``, or what torch sees.

Every step that runs a model (train, tune, eval, inspect, generate, the routers' calibration)
asks :func:`choose_device`. The default is the GPU of this process (``cuda:LOCAL_RANK`` under a
launcher, so each rank takes its own) when torch sees one, else the CPU; ``--device cpu`` (or
``MOEKIT_DEVICE=cpu``) keeps a run off a GPU that is busy or too small, ``cuda:1`` picks a card. A
device this machine does not have is refused with the reason, not discovered in a stack trace.
"""

from __future__ import annotations

import os

import torch

from moekit.errors import InvalidOptionError

DEVICE_ENV = "MOEKIT_DEVICE"


def choose_device(requested: str | None = None, local_rank: int | None = None) -> torch.device:
    """The device to compute on: ``requested``, else ``$MOEKIT_DEVICE``, else this rank's GPU, else the CPU."""
    text = requested or os.environ.get(DEVICE_ENV) or None
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if text is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # a process that sees fewer GPUs than its local rank (e.g. one GPU per Slurm task) takes one of its own
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InvalidOptionError(f"--device {text} is not a device.", "Use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOptionError(
                f"--device {text}: torch sees no GPU here (a CPU build of torch, or no driver).",
                "Use --device cpu, or install a CUDA build of torch.",
            )
        if device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InvalidOptionError(
                f"--device {text} names one GPU, but this is one of several processes: they would all use it.",
                "Give --device cuda (each process takes cuda:LOCAL_RANK), or limit the GPUs with CUDA_VISIBLE_DEVICES.",
            )
        index = rank % torch.cuda.device_count() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise InvalidOptionError(
                f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s).",
                f"Use cuda:0 to cuda:{torch.cuda.device_count() - 1}.",
            )
        return torch.device(f"cuda:{index}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidOptionError(f"--device {text}: MPS is not available here.", "Use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidOptionError(f"--device {text} is not supported.", "Use cpu, cuda, cuda:N or mps.")
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CPUs emulate it: correct, but slow)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def inference_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype to run a model in for inference: fp32 on a CPU (no half-precision speed-up there), the
    checkpoint's own half precision on a GPU (bf16 where it is fp32 on disk)."""
    if device.type != "cuda":
        return torch.float32
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
