"""Progress reporting for long work, on stderr, switched off for library calls and tests.

On a terminal it is a rich bar with ETA. Off a terminal (``moekit train ... > log 2>&1``, a
cluster job's output file) a live bar draws nothing useful, so a plain line is printed instead
every ``MOEKIT_PROGRESS_EVERY`` seconds (default 30; 0 prints every update), plus the first and
the last update: step, share done, the command's own fields (loss, tokens/s), elapsed and ETA.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TextIO

PROGRESS_EVERY_ENV = "MOEKIT_PROGRESS_EVERY"
DEFAULT_PROGRESS_EVERY = 30.0


class Advance(Protocol):
    """Callable that moves a progress bar forward by ``steps``."""

    def __call__(self, steps: int = 1) -> None: ...


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_interval() -> float:
    """Seconds between plain progress lines (``MOEKIT_PROGRESS_EVERY``; invalid values use the default)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, DEFAULT_PROGRESS_EVERY)))
    except ValueError:
        return DEFAULT_PROGRESS_EVERY


class PlainProgress:
    """Prints ``description: n/total (p%) fields, elapsed, ETA`` lines at most every ``interval`` seconds."""

    def __init__(
        self,
        description: str,
        total: int,
        start: int = 0,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description, self.total, self.start = description, max(0, total), start
        self.completed = start
        self.interval = progress_interval() if interval is None else interval
        self.stream = stream or sys.stderr
        self.clock = clock
        self.began = clock()
        self.last_printed: float | None = None

    def update(self, advance: int = 1, fields: dict[str, str] | None = None) -> None:
        """Count ``advance`` more units done; print a line if one is due."""
        self.completed += advance
        now = self.clock()
        finished = self.completed >= self.total
        if self.last_printed is not None and not finished and now - self.last_printed < self.interval:
            return
        self.last_printed = now
        elapsed = now - self.began
        done_here = self.completed - self.start
        eta = elapsed / done_here * (self.total - self.completed) if done_here > 0 else None
        share = f" ({self.completed / self.total:.0%})" if self.total else ""
        extra = "".join(f", {name} {value}" for name, value in (fields or {}).items())
        when = time.strftime("%H:%M:%S")
        line = f"[{when}] {self.description}: {self.completed}/{self.total}{share}{extra}, elapsed {_clock(elapsed)}"
        line += f", ETA {_clock(eta)}" if eta is not None and not finished else (", done" if finished else "")
        print(line, file=self.stream, flush=True)


_PLAIN_LINE = re.compile(
    r"^\[(?P<at>[\d:]{8})\] (?P<what>.+?): (?P<done>\d+)/(?P<total>\d+)(?: \(\d+%\))?(?P<rest>.*)$"
)


def parse_plain_line(line: str) -> dict[str, str] | None:
    """The fields of one line :class:`PlainProgress` printed (``at``, ``what``, ``done``, ``total``, each named
    field, ``elapsed`` and ``ETA``, or ``finished``); None for any other line. ``moekit status`` reads a job's
    log with it."""
    match = _PLAIN_LINE.match(line.strip())
    if match is None:
        return None
    fields = {key: match[key] for key in ("at", "what", "done", "total")}
    for part in match["rest"].split(", ")[1:]:
        name, _, value = part.rpartition(" ")
        if part == "done":
            fields["finished"] = "yes"
        elif name:
            fields[name] = value
    return fields


def notice(text: str) -> None:
    """Say one thing the user should know about a choice made for them (on stderr, so output stays clean)."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


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

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True))


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool) -> Iterator[Advance]:
    """Yield an ``advance`` function; report progress on stderr when ``enabled`` (bar or plain lines)."""
    if not enabled:
        yield lambda steps=1: None
        return
    if not _on_terminal():
        plain = PlainProgress(description, total)
        yield lambda steps=1: plain.update(steps)
        return
    with _rich_progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda steps=1: bar.advance(task, steps)


def _training_fields(row: dict) -> dict[str, str]:
    return {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}


@contextlib.contextmanager
def training_progress(description: str, total: int, start: int, enabled: bool) -> Iterator[Callable[[dict], None]]:
    """Yield ``update(row)``; report step, loss, tokens/s and ETA on stderr when ``enabled`` (and, first, the step
    a resumed run continues from)."""
    if not enabled:
        yield lambda row: None
        return
    if start:
        print(f"[{time.strftime('%H:%M:%S')}] {description}: resuming at step {start}/{total}", file=sys.stderr)
    if not _on_terminal():
        plain = PlainProgress(f"{description} step", total, start)
        yield lambda row: plain.update(1, _training_fields(row))
        return
    with _rich_progress("loss {task.fields[loss]}", "{task.fields[speed]} tok/s") as bar:
        task = bar.add_task(description, total=total, completed=start, loss="-", speed="-")

        def update(row: dict) -> None:
            fields = _training_fields(row)
            bar.update(task, advance=1, loss=fields["loss"], speed=fields["tok/s"])

        yield update


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (moekit draws its own bars)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
