"""The ``moekit`` command line: the command table.

Each command is a plain function in ``moekit.commands`` (Typer reads its signature: options,
defaults, help); this table names it and wraps it in ``user_errors``, the one boundary where a
:class:`~moekit.errors.MoekitError` becomes a clear message and an exit code. Registration is
explicit: importing a command module registers nothing. A new command is one function in
``moekit/commands/NAME_cmd.py`` and one row below. Heavy libraries (torch, transformers) are
imported inside the commands, so ``moekit --help`` answers instantly.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import typer

from moekit.commands import (
    branch_cmd,
    demo_cmd,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    mix_cmd,
    prepare_cmd,
    report_cmd,
    run_cmd,
    status_cmd,
    train_cmd,
    tune_cmd,
)
from moekit.commands.common import user_errors

HELP = (
    "Build Mixture-of-Experts models from dense Hugging Face checkpoints (Branch-Train-MiX).\n\n"
    "Pipeline: branch -> train each branch -> mix -> tune, then inspect and eval; "
    "`moekit run` drives it from a recipe, `moekit demo` shows it on a CPU."
)

# (name, function), in the order `moekit --help` lists them.
COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("branch", branch_cmd.branch_command),
    ("demo", demo_cmd.demo_command),
    ("eval", eval_cmd.eval_command),
    ("generate", generate_cmd.generate_command),
    ("inspect", inspect_cmd.inspect_command),
    ("mix", mix_cmd.mix_command),
    ("prepare", prepare_cmd.prepare_command),
    ("report", report_cmd.report_command),
    ("validate", run_cmd.validate_command),
    ("run", run_cmd.run_command),
    ("status", status_cmd.status_command),
    ("train", train_cmd.train_command),
    ("tune", tune_cmd.tune_command),
]


def help_text(command: Callable[..., Any]) -> str:
    """The command's docstring as its help: lines of a paragraph joined (the source wraps at 120 columns, the
    terminal wraps on its own); a paragraph that starts with ``\\b`` (examples) keeps its lines, as in click."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


def build_app() -> typer.Typer:
    """The Typer app with every command of :data:`COMMANDS` registered behind ``user_errors``."""
    app = typer.Typer(
        name="moekit", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    for name, command in COMMANDS:
        app.command(name, help=help_text(command))(user_errors(command))
    return app


def main() -> None:
    """Console-script entry point."""
    build_app()(prog_name="moekit")


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["COMMANDS", "build_app", "main"]
