"""``moekit tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from moekit.commands.common import DEVICE_OPTION, TEXT_FIELD_OPTION, only_given, parse_key_values, said
from moekit.commands.loop_options import saved_weights_note, with_loop_options
from moekit.config import DEFAULT_AUX_COEF, DEFAULT_CAPACITY_FACTOR, DEFAULT_Z_COEF, TuneConfig, default_of

# Options that go into TuneConfig as they are given.
_AS_GIVEN = (
    "balance_scope",
    "routing",
    "capacity_factor",
    "val_fraction",
    "text_field",
    "resume",
    "force",
    "loop",
    "device",
)


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
            raise InvalidOptionError(
                f"--mix item '{item}' is not DOMAIN=SHARE.", "Write e.g. --mix code=0.4,math=0.3,general=0.3."
            )
    return mixture


def _parse_temperature(text: str) -> tuple[float, float]:
    """'1.0:0.5' -> (1.0, 0.5); '0.7' -> (0.7, 0.7)."""
    from moekit.errors import InvalidOptionError

    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise InvalidOptionError(
            f"--temperature '{text}' is not understood.", "Write START or START:END, e.g. 1.0:0.5."
        )
    return (parts[0], parts[-1])


@with_loop_options
def tune_command(
    model: Path = typer.Argument(
        ...,
        metavar="MODEL",
        help="The MoE from `moekit mix`, or a run directory (uses RUN_DIR/mixed and the branches' data).",
    ),
    data: list[str] = typer.Option(
        [], "--data", help="DOMAIN=PATH tune data; repeat (domains may include general data for the seed expert)."
    ),
    val_data: list[str] = typer.Option(
        [], "--val-data", help="DOMAIN=PATH held-out data (default: the last --val-fraction of the data)."
    ),
    mix: Optional[str] = typer.Option(
        None, "--mix", help="Data mixture, e.g. code=0.4,math=0.3,general=0.3 (default: equal shares)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory (default with a run directory: RUN_DIR/tuned)."
    ),
    train: Optional[str] = typer.Option(
        None,
        "--train",
        help="What learns: all (BTX; the default) | router | router+attn (routers and attention only) | "
        "all-but-experts (BTX's frozen-experts ablation: all but the routed experts) | new-expert+router (after "
        "mix --add-expert: the routers and the added expert only) | hypermoe (the routers and HyperMoE's modules; "
        "the default with --hypermoe).",
    ),
    hypermoe: bool = typer.Option(
        False,
        "--hypermoe",
        help="HyperMoE (Zhao et al. 2024): add a hypernetwork that turns the experts a token did not select into "
        "an adapter added to the MoE output (moekit_moe models: mix --target moekit_moe). Starts as the MoE exactly.",
    ),
    hypermoe_embed_dim: Optional[int] = typer.Option(
        None, "--hypermoe-embed-dim", min=1, help="--hypermoe: expert embedding width (default 128)."
    ),
    hypermoe_adapter_dim: Optional[int] = typer.Option(
        None, "--hypermoe-adapter-dim", min=1, help="--hypermoe: the generated adapter's bottleneck (default 64)."
    ),
    hypermoe_hyper_dim: Optional[int] = typer.Option(
        None, "--hypermoe-hyper-dim", min=1, help="--hypermoe: the shared hypernetwork's hidden width (default 128)."
    ),
    balance: Optional[str] = typer.Option(
        None,
        "--balance",
        help="switch (Switch/HF aux loss; the default, none with --routing sbase) | btx (mean gate values) | bias "
        "(loss-free, DeepSeek-V3: learns the selection bias of glm4_moe/ernie4_5_moe-style targets) | none.",
    ),
    aux_coef: Optional[float] = typer.Option(
        None,
        "--aux-coef",
        help=f"Balancing loss coefficient (default {said(DEFAULT_AUX_COEF)}; with --balance bias 0, and >0 adds "
        "DeepSeek-V3's sequence-wise loss).",
    ),
    bias_rate: Optional[float] = typer.Option(
        None,
        "--bias-rate",
        help="--balance bias: how far the bias moves per step, u (default "
        f"{said(default_of(TuneConfig, 'bias_rate'))}).",
    ),
    bias_rule: Optional[str] = typer.Option(
        None,
        "--bias-rule",
        help="--balance bias: sign (u*sign(mean-load), DeepSeek-V3) | proportional (u*(mean-load)/mean).",
    ),
    z_loss: bool = typer.Option(False, "--z-loss", help="Add the router z-loss (coefficient --z-coef)."),
    z_coef: Optional[float] = typer.Option(
        None, "--z-coef", help=f"Router z-loss coefficient with --z-loss (default {said(DEFAULT_Z_COEF)})."
    ),
    balance_scope: str = typer.Option(
        default_of(TuneConfig, "balance_scope"),
        "--balance-scope",
        help="micro (per micro-batch) | global (counts over the global batch, Qiu et al. 2025).",
    ),
    routing: str = typer.Option(
        default_of(TuneConfig, "routing"),
        "--routing",
        help="Training-time routing (ablations; the saved model routes by its own rule): topk (the model's own) "
        "| switch (top-1, capacity) | soft (all experts) | noisy (Shazeer's noisy top-k) | expert_choice | hash "
        "(token-id hash) | sample_top1 (BTX's Gumbel top-1) | sbase (Sinkhorn-balanced top-k, S-BASE; no "
        "balancing loss).",
    ),
    router_jitter: Optional[float] = typer.Option(
        None,
        "--router-jitter",
        help="Multiply each router's input (only the router's) by U(1-EPS, 1+EPS) while training (Switch's "
        "jitter, e.g. 0.01); nothing at inference. 0 < EPS < 1.",
    ),
    capacity_factor: Optional[float] = typer.Option(
        None,
        "--capacity-factor",
        help=f"switch: capacity = tokens / experts x this (default {DEFAULT_CAPACITY_FACTOR['switch']}); "
        f"expert_choice: tokens x top-k / experts x this (default {DEFAULT_CAPACITY_FACTOR['expert_choice']}).",
    ),
    temperature: Optional[str] = typer.Option(
        None,
        "--temperature",
        help="sample_top1: Gumbel temperature START[:END], linear over training (default "
        f"{':'.join(map(str, default_of(TuneConfig, 'temperature')))}).",
    ),
    val_fraction: Optional[float] = typer.Option(
        None,
        "--val-fraction",
        help="Share of each domain's tokens held out (default: the split the run recorded, else 0.05).",
    ),
    text_field: str = TEXT_FIELD_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted run."),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists."),
    loop: Any = None,  # a LoopSettings, built by with_loop_options from the shared loop options
) -> None:
    """Tune a mixed MoE (router first of all) on a domain mixture with load balancing.

    \b
    Examples:
      moekit tune run --max-steps 1000                       (run dir: its mixed model and branch data)
      moekit tune run/mixed --data code=code.jsonl --data math=math.jsonl --train router --max-steps 200 --out tuned
      moekit tune run/grown --train router --max-steps 200   (a model of a run: its data, out run/grown-tuned)
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.steps.tune import tune
    from moekit.steps.tune.inputs import tune_sources
    from moekit.train.loop import is_main_process

    quiet_transformers()

    _refuse_unused_options(routing, balance, z_loss, capacity_factor, temperature, bias_rate, bias_rule, z_coef)
    inputs = tune_sources(model, parse_key_values(data, "--data"), parse_key_values(val_data, "--val-data"), out)
    sizes = only_given(embed_dim=hypermoe_embed_dim, adapter_dim=hypermoe_adapter_dim, hyper_dim=hypermoe_hyper_dim)
    if sizes and not hypermoe:
        from moekit.errors import InvalidOptionError

        raise InvalidOptionError("--hypermoe-* sizes only apply with --hypermoe.", "Add --hypermoe or remove them.")
    given = only_given(
        train=train,
        hypermoe=sizes if hypermoe else None,
        balance=balance,
        aux_coef=aux_coef,
        router_jitter=router_jitter,
        bias_rate=bias_rate,
        bias_rule=bias_rule,
        temperature=None if temperature is None else _parse_temperature(temperature),
    )
    options = locals()
    cfg = TuneConfig(
        **inputs,
        **given,
        **{name: options[name] for name in _AS_GIVEN},
        mixture=parse_mixture(mix),
        z_coef=(DEFAULT_Z_COEF if z_coef is None else z_coef) if z_loss else 0.0,
    )
    result = tune(cfg)
    if is_main_process():
        _report(Console(), cfg, result)


def _refuse_unused_options(
    routing: str,
    balance: Optional[str],
    z_loss: bool,
    capacity_factor: Optional[float],
    temperature: Optional[str],
    bias_rate: Optional[float],
    bias_rule: Optional[str],
    z_coef: Optional[float],
) -> None:
    """Refuse options that the chosen routing or balancing would silently ignore."""
    from moekit.errors import InvalidOptionError

    if capacity_factor is not None and routing not in ("switch", "expert_choice"):
        raise InvalidOptionError(
            "--capacity-factor only applies with --routing switch or expert_choice.",
            "Remove it or add --routing switch.",
        )
    if temperature is not None and routing != "sample_top1":
        raise InvalidOptionError(
            "--temperature only applies with --routing sample_top1.", "Remove it or add --routing sample_top1."
        )
    if (balance or default_of(TuneConfig, "balance")) != "bias" and (bias_rate is not None or bias_rule is not None):
        raise InvalidOptionError(
            "--bias-rate and --bias-rule only apply with --balance bias.", "Remove them or add --balance bias."
        )
    if z_coef is not None and not z_loss:
        raise InvalidOptionError("--z-coef only applies with --z-loss.", "Add --z-loss.")


def _report(console: Any, cfg: Any, result: Any) -> None:
    """The tuned model's last step, held-out loss and the rounding note."""
    row = result.last_row
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    console.print(
        f"[green]Tuned[/] {cfg.model} -> {result.out}: {result.steps} steps{resumed}, "
        f"loss {row.get('loss', float('nan')):.4f}, "
        f"load imbalance {row.get('load_imbalance', float('nan')):.2f}, MaxVio "
        f"{row.get('maxvio', float('nan')):.2f}, dead experts {row.get('dead_experts')}"
    )
    if result.eval:
        console.print(
            f"Held-out loss of the saved ({result.saved_dtype}) weights: "
            + ", ".join(f"{d} {v:.3f}" for d, v in result.eval.items())
        )
    if note := saved_weights_note(result.unchanged_share, result.saved_dtype, all_trained=cfg.train == "all"):
        console.print(note)
