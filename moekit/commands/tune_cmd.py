"""``moekit tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from moekit.cli import app, parse_key_values, user_errors
from moekit.commands.loop_options import saved_weights_note, with_loop_options


def parse_mixture(text: Optional[str]) -> dict[str, float]:
    """'code=0.4,math=0.3' -> {'code': 0.4, 'math': 0.3}."""
    from moekit.errors import InvalidOptionError

    if not text:
        return {}
    mixture = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            mixture[name.strip()] = float(value)
        except ValueError:
            raise InvalidOptionError(f"--mix item '{item}' is not DOMAIN=SHARE.", "Write e.g. --mix code=0.4,math=0.3,general=0.3.")
    return mixture


def _inputs(model: Path, data: dict[str, str], val_data: dict[str, str], out: Optional[Path]) -> dict[str, Any]:
    """TuneConfig fields for the inputs: from a run directory (its mixed model and branch data) or an MoE directory."""
    from moekit.data import absolute_spec
    from moekit.errors import InvalidOptionError
    from moekit.manifest import MANIFEST_NAME, load_manifest

    given = {d: [absolute_spec(p)] for d, p in data.items()}
    given_val = {d: [absolute_spec(p)] for d, p in val_data.items()}
    if (model / "branches").is_dir() and (model / MANIFEST_NAME).is_file():
        branches = load_manifest(model).branches
        remembered = {name: record.data for name, record in branches.items() if record.data}
        remembered_val = {name: record.val_data for name, record in branches.items() if record.val_data and record.data}
        return {"model": model / "mixed", "data": {**remembered, **given}, "val_data": {**remembered_val, **given_val},
                "out": out or model / "tuned", "run_dir": model}
    if out is None:
        raise InvalidOptionError("No output directory.", "Pass --out DIR (or give a run directory, whose default is RUN_DIR/tuned).")
    return {"model": model, "data": given, "val_data": given_val, "out": out, "run_dir": None}


@app.command("tune")
@user_errors
@with_loop_options
def tune_command(
    model: Path = typer.Argument(..., metavar="MODEL", help="The MoE from `moekit mix`, or a run directory (uses RUN_DIR/mixed and the branches' data)."),
    data: list[str] = typer.Option([], "--data", help="DOMAIN=PATH tune data; repeat (domains may include general data for the seed expert)."),
    val_data: list[str] = typer.Option([], "--val-data", help="DOMAIN=PATH held-out data (default: the last --val-fraction of the data)."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Data mixture, e.g. code=0.4,math=0.3,general=0.3 (default: equal shares)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default with a run directory: RUN_DIR/tuned)."),
    train: str = typer.Option("all", "--train", help="What learns: all (BTX) | router | router+attn (routers and attention only) | all-but-experts (BTX's frozen-experts ablation: all but the routed experts)."),
    balance: str = typer.Option("switch", "--balance", help="switch (Switch/HF aux loss) | btx (mean gate values) | bias (loss-free; needs a target with a selection bias) | none."),
    aux_coef: float = typer.Option(0.01, "--aux-coef", help="Balancing loss coefficient."),
    z_loss: bool = typer.Option(False, "--z-loss", help="Add the router z-loss (coefficient --z-coef)."),
    z_coef: Optional[float] = typer.Option(None, "--z-coef", help="Router z-loss coefficient with --z-loss (default 1e-3)."),
    balance_scope: str = typer.Option("micro", "--balance-scope", help="micro (per micro-batch) | global (counts over the global batch, Qiu et al. 2025)."),
    routing: str = typer.Option("topk", "--routing", help="Training-time routing: topk (the model's own) | switch (top-1, capacity) | soft (all experts)."),
    capacity_factor: Optional[float] = typer.Option(None, "--capacity-factor", help="Switch routing: capacity = tokens / experts x this (default 1.5)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of each domain's tokens held out (default: the split the run recorded, else 0.05)."),
    text_field: str = typer.Option("text", "--text-field", help="Text field of .jsonl/.json/.parquet records."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted run."),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists."),
    loop: Any = None,  # a LoopSettings, built by with_loop_options from the shared loop options
) -> None:
    """Tune a mixed MoE (router first of all) on a domain mixture with load balancing.

    \b
    Examples:
      moekit tune run --max-steps 1000                       (run dir: its mixed model and branch data)
      moekit tune run/mixed --data code=code.jsonl --data math=math.jsonl --train router --max-steps 200 --out tuned
    """
    from rich.console import Console

    from moekit.config import TuneConfig
    from moekit.errors import InvalidOptionError
    from moekit.progress import quiet_transformers
    from moekit.steps.tune import tune
    from moekit.training import is_main_process

    quiet_transformers()

    if capacity_factor is not None and routing != "switch":
        raise InvalidOptionError("--capacity-factor only applies with --routing switch.", "Remove it or add --routing switch.")
    if z_coef is not None and not z_loss:
        raise InvalidOptionError("--z-coef only applies with --z-loss.", "Add --z-loss.")
    inputs = _inputs(model, parse_key_values(data, "--data"), parse_key_values(val_data, "--val-data"), out)
    cfg = TuneConfig(
        **inputs,
        mixture=parse_mixture(mix), train=train, balance=balance, aux_coef=aux_coef, z_coef=(1e-3 if z_coef is None else z_coef) if z_loss else 0.0,
        balance_scope=balance_scope, routing=routing, capacity_factor=1.5 if capacity_factor is None else capacity_factor, val_fraction=val_fraction,
        text_field=text_field, resume=resume, force=force, loop=loop,
    )
    result = tune(cfg)
    if not is_main_process():
        return
    row = result.last_row
    console = Console()
    console.print(f"[green]Tuned[/] {cfg.model} -> {result.out}: {result.steps} steps, loss {row.get('loss', float('nan')):.4f}, "
                  f"load imbalance {row.get('load_imbalance', float('nan')):.2f}, MaxVio {row.get('maxvio', float('nan')):.2f}, dead experts {row.get('dead_experts')}")
    if result.eval:
        console.print(f"Held-out loss of the saved ({result.saved_dtype}) weights: " + ", ".join(f"{d} {v:.3f}" for d, v in result.eval.items()))
    if note := saved_weights_note(result.unchanged_share, result.saved_dtype, all_trained=cfg.train == "all"):
        console.print(note)
