"""Progress bars for long work (rich, on stderr), switched off for library calls and tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Advance(Protocol):
    """Callable that moves a progress bar forward by ``steps``."""

    def __call__(self, steps: int = 1) -> None: ...


def _rich_progress(*fields: str) -> Any:
    """A rich Progress on stderr: description, bar, n/total, the given text fields, elapsed, ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *(TextColumn(f) for f in fields),
               TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True))


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool) -> Iterator[Advance]:
    """Yield an ``advance`` function; draw a rich bar with ETA on stderr when ``enabled``."""
    if not enabled:
        yield lambda steps=1: None
        return
    with _rich_progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps=1: bar.advance(task, steps)


@contextlib.contextmanager
def training_progress(description: str, total: int, start: int, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """Yield ``update(row)``; draw a bar with loss, tokens/s and ETA on stderr when ``enabled``."""
    if not enabled:
        yield lambda row: None
        return
    with _rich_progress("loss {task.fields[loss]}", "{task.fields[speed]} tok/s") as bar:
        task = bar.add_task(description, total=total, completed=start, loss="-", speed="-")

        def update(row: dict) -> None:
            bar.update(task, advance=1, loss=f"{row['loss']:.4f}", speed=f"{row['tokens_per_s']:,.0f}")

        yield update


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (moekit draws its own bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
