"""``moekit mix --add-expert``: growing a built MoE by one expert (the options, the step call, the report)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from moekit.commands.common import given_options

if TYPE_CHECKING:
    from rich.console import Console

    from moekit.steps.mix.grow import GrowResult


def grow_from_options(
    options: dict[str, Any], calibration: dict[str, int], mixing: list[str], command: Callable[..., Any]
) -> None:
    """``mix`` with ``--add-expert`` (or ``--into``, or ``--router mean``): refuse what does not apply, then grow.

    ``options``: mix's parameters; ``mixing``: the options that shape a new mix (refused here).
    """
    from moekit.commands.common import parse_key_values
    from moekit.errors import InvalidOptionError

    add_expert, router = options["add_expert"], options["router"]
    if add_expert is None and options["into"] is None:
        raise InvalidOptionError(
            "--router mean only applies with --add-expert.", "Use --router random or --router centroid."
        )
    refuse_mixing_options({name: options[name] for name in mixing}, add_expert, command)
    if router not in ("random", "centroid", "mean"):  # random, the default, means "not given" here
        raise InvalidOptionError(
            f"--router {router} does not apply with --add-expert.",
            "Use --router centroid (the default: a row fitted on calibration data) or --router mean (the mean "
            "of the existing rows, no data needed).",
        )
    grow_moe(
        options["run_dir"],
        add_expert,
        options["into"],
        options["out"],
        parse_key_values(options["router_data"], "--router-data"),
        calibration,
        options["shard_size"],
        options["force"],
        "mean" if router == "mean" else "calibrated",
    )


def grow_moe(
    run_dir: Optional[Path],
    add_expert: Optional[str],
    into: Optional[Path],
    out: Optional[Path],
    router_data: dict[str, str],
    calibration: dict[str, int],
    shard_size: str,
    force: bool,
    row: str,
) -> None:
    """``mix --add-expert``: the inputs from NAME[=DIR], --into and --out (RUN_DIR's where given), then grow the MoE."""
    from rich.console import Console

    from moekit.config import GrowConfig
    from moekit.steps.mix.grow import add_expert as grow
    from moekit.steps.mix.grow_inputs import grow_sources

    assert add_expert is not None
    name, branch_dir, into, out = grow_sources(run_dir, add_expert, into, out)
    cfg = GrowConfig(
        into=into,
        name=name,
        branch=branch_dir,
        out=out,
        run_dir=run_dir,
        shard_size=shard_size,
        force=force,
        router_data=router_data,
        router=row,
        **calibration,
    )
    report_grow(Console(), grow(cfg, show_progress=True), name, run_dir)


def refuse_mixing_options(values: dict[str, Any], add_expert: str | None, command: Callable[..., Any]) -> None:
    """With --add-expert the MoE keeps its experts, top-k, dtype and averaged tensors: refuse options that would
    change them."""
    from moekit.errors import InvalidOptionError

    given = given_options(values, command)
    if given:
        raise InvalidOptionError(
            f"{', '.join(given)} do(es) not apply with --add-expert: the MoE keeps its experts, top-k, dtype "
            "and averaged tensors.",
            f"Remove {', '.join(given)}.",
        )
    if add_expert is None:
        raise InvalidOptionError(
            "--into only applies with --add-expert.", "Add --add-expert NAME[=DIR], or remove --into."
        )


def report_grow(console: Console, result: GrowResult, name: str, run_dir: Optional[Path]) -> None:
    console.print(
        f"[green]Wrote[/] {result.moe_type} MoE with {len(result.experts)} routed experts "
        f"({', '.join(result.experts)}) to {result.out}"
    )
    if "init_new_domain_top_k" in result.router_stats:
        console.print(
            f"New router rows: {result.router_stats['init_new_domain_top_k']:.0%} of {name} tokens and "
            f"{result.router_stats['init_old_domains_top_k']:.0%} of the other domains' tokens have expert '{name}' "
            "in their top-k."
        )
    else:
        console.print(
            "New router rows: the mean of each layer's existing rows (no calibration data); tune the router to teach "
            f"it when to choose '{name}'."
        )
    for note in result.notes:
        console.print(f"[yellow]Note:[/] {note}")
    console.print(
        "Every old tensor is kept byte for byte. Tune the router next, e.g. moekit tune "
        f"{result.out} --train router{'' if run_dir else ' --data ' + name + '=PATH --out DIR'}."
    )
