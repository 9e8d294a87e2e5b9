"""Writing a trained model back as a Hugging Face directory (shared by ``train`` and ``tune``)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from moekit.io.atomic import atomic_output_dir
from moekit.io.files import copy_tokenizer_and_generation_files


def write_trained_model(
    out_dir: Path, source_dir: Path, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], dtype: torch.dtype,
    extra_files: list[Path] | None = None, force: bool = True, add_files: Callable[[Path], None] | None = None,
) -> None:
    """Save ``state_dict`` (cast to ``dtype``) with ``model``'s config into ``out_dir`` atomically.

    Tokenizer and generation files come from ``source_dir``; ``extra_files`` are copied in. The
    directory is built aside and renamed into place, so files of the old ``out_dir`` (which may be
    hard links shared with a seed) are never written into. ``add_files(tmp)`` may write more
    files (provenance, model card) before the rename.
    """
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu() for k, v in state_dict.items()}
    with atomic_output_dir(out_dir, force=force) as tmp:
        model.config.dtype = dtype
        model.save_pretrained(tmp, state_dict=state)
        copy_tokenizer_and_generation_files(source_dir, tmp)
        for path in extra_files or []:
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
        if add_files is not None:
            add_files(tmp)
