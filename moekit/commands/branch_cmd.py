"""``moekit branch``."""

from __future__ import annotations

from pathlib import Path

import typer


def branch_command(
    seed: str = typer.Argument(
        ..., metavar="SEED", help="Dense seed model: a local Hugging Face directory or a hub id."
    ),
    run_dir: Path = typer.Argument(
        ..., metavar="RUN_DIR", help="Run directory to create (holds moekit.yaml and branches/)."
    ),
    domain: list[str] = typer.Option(..., "--domain", "-d", help="A branch/domain name; repeat for each branch."),
    copy: bool = typer.Option(
        False, "--copy", help="Write real copies instead of reflinks/hard links to the seed's files."
    ),
    force: bool = typer.Option(False, "--force", help="Replace RUN_DIR if it exists and is not empty."),
    add: bool = typer.Option(
        False,
        "--add",
        help="Add branches to the existing RUN_DIR (same seed; e.g. a domain to grow a built MoE with: mix "
        "--add-expert).",
    ),
) -> None:
    """Create RUN_DIR with one dense copy of SEED per domain, ready for `moekit train`.

    Copies are reflinks or hard links where possible (no extra disk use); moekit never writes into a file shared
    with the seed. Example: moekit branch ./llama run --domain code --domain math
    """
    from rich.console import Console

    from moekit.errors import InvalidOptionError
    from moekit.steps.branch import add_branches, branch

    if add and force:
        raise InvalidOptionError(
            "--add keeps the run and --force replaces it: give one.", "Drop --force to add branches."
        )
    result = (
        add_branches(seed, run_dir, domain, copy=copy) if add else branch(seed, run_dir, domain, copy=copy, force=force)
    )
    console = Console()
    console.print(
        f"[green]Created run[/] {result.run_dir} (seed sha256 {result.seed_sha256[:12]}, files {result.link_mode})"
    )
    for name, path in result.branches.items():
        console.print(f"  branch [bold]{name}[/]: {path}")
    if add:
        names = " ".join(f"--branch {n}" for n in result.branches)
        console.print(
            f"Next: `moekit train {run_dir} {names} --data NAME=PATH`, then `moekit mix {run_dir} --add-expert NAME`."
        )
    else:
        console.print(f"Next: train each branch, then `moekit mix {run_dir}`.")
