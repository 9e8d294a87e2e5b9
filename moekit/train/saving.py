"""Writing a trained model back as a Hugging Face directory (shared by ``train`` and ``tune``).

Three things real checkpoints need that a plain ``save_pretrained(state_dict=...)`` gets wrong:

- **Tied weights stay tied.** A gathered state dict holds the tied LM head as its own entry
  (and once cast tensor by tensor it no longer shares storage with the embedding, so
  transformers cannot see the tie and saves a second copy). The model's own tie map
  (``all_tied_weights_keys``) names the copies; they are dropped before saving.
- **config.json states the dtype of the saved tensors.** save_pretrained writes the in-memory
  (fp32 training) dtype; moekit rewrites ``dtype``/``torch_dtype`` to the saved one, so loading
  with defaults does not double memory.
- **The hub layout, always.** A model read from a fused-expert checkpoint is written back
  per expert (the layout every reader loads).
- **fp32 where the family keeps it.** Routers and selection biases that transformers keeps in
  fp32 in memory (``_keep_in_fp32_modules_strict``: GLM-4.5, ERNIE 4.5) are saved in fp32.
- **Rounding is measured.** Casting fp32 training weights back to bf16/fp16 can round small
  updates away; the share of weights that came out bit-identical to the input is reported.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.arch import expert_count_keys
from moekit.errors import NonFiniteError
from moekit.io.atomic import check_free_space
from moekit.io.checkpoint import Checkpoint
from moekit.io.config_json import make_config_portable
from moekit.io.files import copy_tokenizer_and_generation_files
from moekit.io.outputs import OutputKind, atomic_output_dir, guard_output

_COMPARE_CHUNK_ELEMENTS = 8 << 20  # values compared per read when measuring unchanged weights


@dataclass(frozen=True)
class SavedModel:
    """What :func:`write_trained_model` wrote."""

    dtype: torch.dtype
    tensors: int
    unchanged_share: float | None  # share of weight values bit-identical to the input (None: not comparable)


def resolve_save_dtype(choice: str, model_dir: Path) -> torch.dtype:
    """The dtype to save trained weights in: the explicit choice, or (auto) the input model's own."""
    return Checkpoint(model_dir).dtype() if choice == "auto" else getattr(torch, choice)


def tied_copies(model: torch.nn.Module) -> set[str]:
    """State-dict keys that are tied to another key (e.g. ``lm_head.weight`` -> the embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied)


def kept_in_fp32(model: torch.nn.Module) -> Callable[[str], bool]:
    """Whether a parameter name is one the model keeps in fp32 whatever its dtype (transformers'
    ``_keep_in_fp32_modules_strict``)."""
    patterns = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return lambda name: any(pattern in name for pattern in patterns)


def saved_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors to save: tied copies dropped, floating tensors cast to ``dtype`` on the CPU (fp32-kept ones stay
    fp32).

    ``state_dict`` is emptied as it is converted, so a gathered (FSDP) copy of the weights is
    released tensor by tensor instead of living next to its converted copy.
    """
    dropped = tied_copies(model)
    fp32 = kept_in_fp32(model)
    state = {}
    for name in list(state_dict):
        tensor = state_dict.pop(name).detach()
        if name not in dropped:
            target = torch.float32 if fp32(name) and tensor.dtype == torch.float32 else dtype
            state[name] = tensor.to("cpu", target) if tensor.is_floating_point() else tensor.cpu()
    broken = next(
        (
            name
            for name, tensor in state.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ),
        None,
    )
    if broken is not None:
        raise NonFiniteError(
            "The trained weights hold NaN or infinite values (e.g. "
            f"{broken}{'' if dtype == torch.float32 else f' after the cast to {dtype}'}); nothing was written.",
            "The run diverged or its values overflow the saved dtype: lower --lr, or save with --save-dtype float32.",
        )
    return state


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns as integers (so 0.0 vs -0.0 differ and NaN equals itself)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.reshape(-1).view(integer)


def unchanged_share(before: Path, after: Path) -> float | None:
    """Share of weight values in ``after`` that are bit-identical to ``before`` (same names and dtypes).

    Streams both checkpoints in row chunks. None when no tensor is comparable (e.g. the layout
    changed from fused to per-expert experts, or ``before`` is not a model directory).
    """
    if not (Path(before) / "config.json").is_file():
        return None
    old, new = Checkpoint(before), Checkpoint(after)
    same = total = 0
    try:
        for name, info in new.tensors.items():
            previous = old.tensors.get(name)
            if previous is None or (previous.dtype, previous.shape) != (info.dtype, info.shape) or not info.shape:
                continue
            step = max(1, _COMPARE_CHUNK_ELEMENTS // max(1, math.prod(info.shape[1:])))
            for start in range(0, info.shape[0], step):
                stop = min(info.shape[0], start + step)
                a, b = old.get_rows(name, start, stop), new.get_rows(name, start, stop)
                same += int((_bits(a) == _bits(b)).sum())
                total += a.numel()
    finally:
        old.close()
        new.close()
    return same / total if total else None


def write_trained_model(
    out_dir: Path,
    source_dir: Path,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    extra_files: list[Path] | None = None,
    force: bool = True,
    add_files: Callable[[Path], None] | None = None,
    kind: OutputKind = "model",
) -> SavedModel:
    """Save ``state_dict`` (cast to ``dtype``) with ``model``'s config into ``out_dir`` atomically.

    Tokenizer and generation files come from ``source_dir`` (made portable); ``extra_files``
    are copied in. The directory is built aside and renamed into place, so files of the old
    ``out_dir`` (which may be hard links shared with a seed) are never written into.
    ``add_files(tmp)`` may write more files (provenance, model card) before the rename. ``kind``:
    what ``out_dir`` is (``branch`` for a branch trained in place), for the output guard.
    """
    state = saved_state_dict(model, state_dict, dtype)
    guard_output(out_dir, kind, force)
    check_free_space(out_dir, sum(t.numel() * t.element_size() for t in state.values()))
    if hasattr(model, "_weight_conversions") and not model._weight_conversions:
        # Loaded from a fused (save_original_format=False) checkpoint, transformers records no
        # conversion and would save fused again, which transformers 4.x, vLLM and llama.cpp cannot
        # read. Without a record it reverts the family's default mapping: the per-expert hub layout.
        model._weight_conversions = None
    with atomic_output_dir(out_dir, kind, force=force) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        del state
        make_config_portable(tmp, dtype, expert_count_keys(str(model.config.model_type)))
        copy_tokenizer_and_generation_files(source_dir, tmp)
        for path in extra_files or []:
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        if add_files is not None:
            add_files(tmp)
        share = unchanged_share(source_dir, tmp)
        count = len(Checkpoint(tmp).tensors)
    return SavedModel(dtype, count, share)


def round_to_saved_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter to ``dtype`` and back, in place.

    Training keeps fp32 master weights; the model is saved in ``dtype`` (often bf16). Rounding
    before the final evaluation makes the reported held-out loss that of the weights as saved
    (and the later cast to ``dtype`` exact). Works on plain, DDP and FSDP2 (DTensor) parameters.
    Parameters the family keeps in fp32 (routers of GLM-4.5, ERNIE 4.5) are saved in fp32 and not rounded.
    """
    fp32 = kept_in_fp32(getattr(model, "module", model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and param.dtype != dtype and not fp32(name.removeprefix("module.")):
                param.copy_(param.to(dtype))
