"""``moekit status``."""

from __future__ import annotations

from pathlib import Path

import typer


def status_command(
    run: Path = typer.Argument(
        ..., metavar="RUN", help="A recipe file, its workdir, or the run directory inside it (WORKDIR/run)."
    ),
    cancel: bool = typer.Option(False, "--cancel", help="Cancel the run's jobs that are pending or running."),
) -> None:
    """Show each stage of a recipe run: state, job, step / total, loss, tokens/s, ETA and log file.

    Reads the run manifest, the scheduler (Slurm's squeue, or the local jobs' processes) and what each job recorded,
    so it is right while jobs run, after moekit run has exited, and once Slurm has forgotten finished jobs.
    """
    from rich.console import Console

    from moekit.commands.run_cmd import show_status

    show_status(run, cancel, Console())
