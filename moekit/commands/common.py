"""What every command shares: the error boundary, option parsers and shared option declarations.

``user_errors`` is the boundary between moekit and the terminal: a
:class:`~moekit.errors.MoekitError` becomes a red one-paragraph message on stderr and exit code 2;
nothing a user typed wrong ever ends in a traceback. ``moekit.cli`` applies it to every command
of its table, so a command cannot miss it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from pydantic import BaseModel

from moekit.config import DEFAULT_TEXT_FIELD, DEVICE_HELP, InspectConfig, default_of


def _print_error(message: str, hint: str = "") -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, highlight=False)
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # paths may contain [ ]
    if hint:
        console.print(f"[yellow]fix:[/] {escape(hint)}", soft_wrap=True)


_DISK_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")


def environment_failure(exc: BaseException) -> tuple[str, str] | None:
    """(message, fix) for a failure of the machine rather than of moekit: full disk, read-only or forbidden path.

    torch and safetensors wrap a full disk in their own exception types, so the exception chain
    and the message text are both searched.
    """
    import errno

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        where = f" ({item.filename})" if isinstance(item, OSError) and item.filename else ""
        code = item.errno if isinstance(item, OSError) else None
        if code in (errno.ENOSPC, errno.EDQUOT) or any(t in str(item) for t in _DISK_FULL_TEXTS):
            return (
                f"The disk is full: writing failed{where}.",
                "Free space on that disk, or write to another disk. Unfinished outputs were removed; "
                "train/tune checkpoints written before are kept for --resume.",
            )
        if code == errno.EROFS:
            return f"A read-only file system refused a write{where}.", "Write outputs to a writable location."
        if code in (errno.EACCES, errno.EPERM):
            return f"Permission denied{where}.", "Use paths you can read and write, or fix their permissions."
    return None


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as 'field: message' (or just the message for whole-config checks)."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(map(str, error["loc"]))
    return f"{where}: {message}" if where else message


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers send before killing a job), handled exactly like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _handle_sigterm() -> Any:
    """Turn SIGTERM into :class:`Terminated`, so temporary outputs are cleaned up as on Ctrl-C; return the old
    handler."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_terminated)
    return None


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MoekitError (and invalid option values) into a clear message and exit code 2.

    Ctrl-C and SIGTERM end the command with the same "interrupted" message (exit 130 and 143);
    a full disk, a read-only file system or a permission error gets a message too (exit 1).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pydantic import ValidationError

        from moekit.errors import MoekitError

        previous = _handle_sigterm()
        try:
            return func(*args, **kwargs)
        except MoekitError as exc:
            _print_error(exc.message, exc.hint)
            raise typer.Exit(exc.exit_code)
        except ValidationError as exc:
            problems = "; ".join(_describe(e) for e in exc.errors())
            _print_error(f"Invalid option value: {problems}.", "See --help for the allowed values.")
            raise typer.Exit(2)
        except Exception as exc:  # only machine failures are turned into messages; anything else is a bug: traceback
            failure = environment_failure(exc)
            if failure is None:
                raise
            _print_error(*failure)
            raise typer.Exit(1)
        except KeyboardInterrupt as exc:
            how = "Terminated (SIGTERM)" if isinstance(exc, Terminated) else "Interrupted"
            _print_error(
                f"{how}. Unfinished outputs were discarded; checkpoints already written by train or tune are "
                "kept for --resume."
            )
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130)
        finally:
            _restore_sigterm(previous)  # a command run in-process (tests, notebooks) leaves the handler as it was

    return wrapper


def parse_key_values(items: list[str], option: str) -> dict[str, str]:
    """Parse repeated NAME=VALUE options into a dict; raise InvalidOptionError on bad items."""
    from moekit.errors import InvalidOptionError

    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InvalidOptionError(
                f"{option} expects NAME=PATH, got '{item}'.", f"Write e.g. {option} code=data/code.jsonl."
            )
        if name in result:
            raise InvalidOptionError(f"{option} names '{name}' twice.", "Give each name once.")
        result[name] = value
    return result


def said(value: Any) -> str:
    """A default as help text says it: 0.5, 8192, 1 (not 1.0), 1e-3 (not 0.001)."""
    if not isinstance(value, float):
        return str(value)
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def given_options(values: dict[str, Any], command: Callable[..., Any]) -> list[str]:
    """The ``--flags`` among ``values`` (parameter name -> value) whose value is not the default ``command``
    declares."""
    import inspect

    defaults = {
        name: getattr(p.default, "default", p.default) for name, p in inspect.signature(command).parameters.items()
    }
    return [f"--{name.replace('_', '-')}" for name, value in values.items() if value != defaults[name]]


def fields_of(config: type[BaseModel], options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` (a command's parameters, ``locals()``) named like fields of ``config``: the
    options that go into the config as they were given (``seq_len`` only when given: its default is fitted to the
    model's context)."""
    fields = {name: value for name, value in options.items() if name in config.model_fields}
    if fields.get("seq_len", 0) is None:
        del fields["seq_len"]
    return fields


def only_given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that are not None: options the user gave, for a config whose defaults fill in the rest."""
    return {name: value for name, value in values.items() if value is not None}


def refuse_unused(options: dict[str, object], mode_on: bool, mode: str) -> None:
    """Raise if options that only apply with ``mode`` were given (not None) without it: never ignore an option
    silently."""
    from moekit.errors import InvalidOptionError

    given = [name for name, value in options.items() if value is not None]
    if given and not mode_on:
        raise InvalidOptionError(
            f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with {mode}.",
            f"Remove {', '.join(given)} or add {mode}.",
        )


# Options several commands share, declared once (Typer reads them from each command's signature).
TEXT_FIELD_OPTION = typer.Option(
    DEFAULT_TEXT_FIELD, "--text-field", help="Text field of .jsonl/.json/.parquet records."
)
MAX_TOKENS_OPTION = typer.Option(default_of(InspectConfig, "max_tokens"), "--max-tokens", help="Tokens per domain.")
SEQ_LEN_OPTION = typer.Option(
    None,
    "--seq-len",
    help=f"Tokens per block (default {default_of(InspectConfig, 'seq_len')}, or the model's context when that is "
    "shorter).",
)
BATCH_SIZE_OPTION = typer.Option(
    default_of(InspectConfig, "batch_size"), "--batch-size", help="Blocks per forward pass."
)
DEVICE_OPTION = typer.Option(None, "--device", help=f"Where to compute: {DEVICE_HELP}.")
