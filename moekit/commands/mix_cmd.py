"""``moekit mix``: option parsing for the three ways to name the inputs (run dir, experts, upcycle) and for
--add-expert."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from moekit.commands.common import only_given, parse_key_values, refuse_unused, said
from moekit.config import MixConfig, UpcycleSettings, default_of

if TYPE_CHECKING:
    from rich.console import Console

    from moekit.steps.mix import MixResult

_ZEROS_REFUSAL = (
    "--router zeros is refused: with an all-zero router every logit ties, top-k then sends every "
    "token to the same experts and their gradients are identical, so the experts never separate."
)
# Options that shape a new mix (with --add-expert the MoE keeps its own) and go into MixConfig as they are given.
_SHAPING = (
    "target",
    "split",
    "merge",
    "dtype",
    "top_k",
    "router",
    "router_std",
    "expert_scale",
    "random_seed",
    "attention_experts",
    "attention_kv",
    "attention_top_k",
    "groups",
    "topk_groups",
)
_AS_GIVEN = (*_SHAPING, "shard_size", "force", "run_dir")
# Every option that shapes a new mix; refused with --add-expert.
_MIXING = (
    *_SHAPING,
    "expert",
    "seed_model",
    "upcycle",
    "experts",
    "drop_fraction",
    "seed_as",
    "seed_expert",
    "average",
    "merge_density",
    "merge_scale",
    "router_sharpness",
)


def _parse_average(text: str) -> tuple[str, Optional[list[float]]]:
    from moekit.errors import InvalidOptionError

    mode, _, weights = text.partition(":")
    if mode in ("uniform", "seed") and not weights:
        return mode, None
    if mode == "weighted" and weights:
        try:
            return mode, [float(w) for w in weights.split(",")]
        except ValueError:
            pass
    raise InvalidOptionError(
        f"--average '{text}' is not understood.", "Use uniform, seed, or weighted:W1,W2,... (one per branch)."
    )


def _parse_experts(items: list[str]) -> list[tuple[str, Path]]:
    experts = []
    for item in items:
        name, sep, path = item.partition("=")
        experts.append((name, Path(path)) if sep else (Path(item).name, Path(item)))
    return experts


def mix_command(
    run_dir: Optional[Path] = typer.Argument(
        None, metavar="RUN_DIR", help="Run directory made by `moekit branch` (experts = its branches)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output directory (default with RUN_DIR: RUN_DIR/mixed)."
    ),
    expert: list[str] = typer.Option(
        [], "--expert", "-e", help="[NAME=]DIR of a dense branch; repeat (instead of RUN_DIR)."
    ),
    seed_model: Optional[str] = typer.Option(
        None,
        "--seed-model",
        help="Seed for --expert mode (needed with the seed expert; else default: the first expert).",
    ),
    upcycle: Optional[str] = typer.Option(
        None, "--upcycle", help="Sparse upcycling: every expert is a copy of this seed's FFN."
    ),
    experts: Optional[int] = typer.Option(
        None,
        "--experts",
        min=1,
        help=f"Number of experts with --upcycle (default {said(default_of(UpcycleSettings, 'num_experts'))}).",
    ),
    drop_fraction: Optional[float] = typer.Option(
        None,
        "--drop-fraction",
        min=0.0,
        max=1.0,
        help="Drop-upcycling: share of each expert's FFN units re-initialised (0.5 in the paper; default "
        f"{said(default_of(UpcycleSettings, 'drop_fraction'))}).",
    ),
    seed_as: Optional[str] = typer.Option(
        None,
        "--seed-as",
        help="The seed's FFN: routed (a generalist expert, BTX; default) | shared (the always-on shared expert; "
        "targets with one) | none.",
    ),
    seed_expert: Optional[bool] = typer.Option(
        None, "--seed-expert/--no-seed-expert", hidden=True, help="Old spelling of --seed-as routed / --seed-as none."
    ),
    target: Optional[str] = typer.Option(
        None,
        "--target",
        help="MoE family to build (default: the seed family's; e.g. glm4_moe or ernie4_5_moe for a selection "
        "bias). See docs/formats.md.",
    ),
    split: int = typer.Option(
        default_of(MixConfig, "split"),
        "--split",
        min=1,
        max=64,
        help="Fine-grained experts: cut each expert FFN into this many experts of 1/split the width (top-k "
        "scales with it).",
    ),
    groups: Optional[int] = typer.Option(
        None,
        "--groups",
        min=1,
        help="Group-limited routing (DeepSeek-V3's rule; targets with groups, e.g. glm4_moe): the routed experts "
        "form G equal groups of at least 2; a token takes its top-k from the --topk-groups best groups.",
    ),
    topk_groups: Optional[int] = typer.Option(
        None, "--topk-groups", min=1, help="With --groups: how many groups each token may take experts from."
    ),
    average: str = typer.Option(
        default_of(MixConfig, "average"),
        "--average",
        help="Non-FFN tensors: uniform | seed | weighted:W1,W2,... (branch order).",
    ),
    merge: str = typer.Option(
        default_of(MixConfig, "merge"),
        "--merge",
        help="How the averaged tensors combine: mean (BTX) | task-arithmetic | ties | dare (seed + merged "
        "deltas of the branches).",
    ),
    merge_density: Optional[float] = typer.Option(
        None,
        "--merge-density",
        help="ties/dare: share of each branch's delta kept, in (0, 1] (default "
        f"{said(default_of(MixConfig, 'merge_density'))}).",
    ),
    merge_scale: Optional[float] = typer.Option(
        None,
        "--merge-scale",
        help="task-arithmetic/ties/dare: multiplies the merged delta (default "
        f"{said(default_of(MixConfig, 'merge_scale'))}: the mean of the deltas).",
    ),
    dtype: str = typer.Option(
        default_of(MixConfig, "dtype"),
        "--dtype",
        help="Output dtype: auto (the seed's) | float32 | bfloat16 | float16.",
    ),
    top_k: int = typer.Option(default_of(MixConfig, "top_k"), "--top-k", min=1, help="Experts per token."),
    router: str = typer.Option(
        default_of(MixConfig, "router"),
        "--router",
        help="Router init: random (small std) | centroid (data-aware). With --add-expert, the new row: centroid "
        "(default: fitted on --router-data) | mean (the mean of the existing rows; no data needed).",
    ),
    router_data: list[str] = typer.Option(
        [], "--router-data", help="DOMAIN=PATH calibration text for --router centroid; repeat."
    ),
    router_std: Optional[float] = typer.Option(
        None, "--router-std", help="Std of the random router, at most 0.1 (default: the model's initializer_range)."
    ),
    router_sharpness: Optional[float] = typer.Option(
        None,
        "--router-sharpness",
        help="Centroid init: 0 = uniform, 1 = saturated initial routing (default "
        f"{said(default_of(MixConfig, 'router_sharpness'))}).",
    ),
    router_tokens: Optional[int] = typer.Option(
        None,
        "--router-tokens",
        help=f"Centroid init: calibration tokens per domain (default {default_of(MixConfig, 'router_tokens')}).",
    ),
    router_seq_len: Optional[int] = typer.Option(
        None,
        "--router-seq-len",
        help=f"Centroid init: calibration sequence length (default {default_of(MixConfig, 'router_block_size')}).",
    ),
    expert_scale: float = typer.Option(
        default_of(MixConfig, "expert_scale"),
        "--expert-scale",
        help="Multiply each expert's down projection (output scale).",
    ),
    random_seed: int = typer.Option(
        default_of(MixConfig, "random_seed"), "--random-seed", help="Seed for router and drop-upcycling randomness."
    ),
    shard_size: str = typer.Option(
        default_of(MixConfig, "shard_size"), "--shard-size", help="Maximum size of one safetensors shard."
    ),
    attention_experts: bool = typer.Option(
        False,
        "--attention-experts",
        help="Branch-Attend-Mix: each source's attention becomes an attention expert under a router per layer, "
        "instead of being averaged. Builds moekit's own family (target moekit_moe; loads with "
        "trust_remote_code=True; not vLLM or llama.cpp).",
    ),
    attention_kv: str = typer.Option(
        default_of(MixConfig, "attention_kv"),
        "--attention-kv",
        help="With --attention-experts: shared (key/value projections averaged, query/output per expert: BAM's "
        "compute-matched variant) | expert (every projection per expert, a KV cache per expert).",
    ),
    attention_top_k: int = typer.Option(
        default_of(MixConfig, "attention_top_k"),
        "--attention-top-k",
        min=0,
        help="With --attention-experts: 0 = soft routing (every attention expert, softmax weights; BAM's best) | "
        "k = top-k.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists and is not empty."),
    add_expert: Optional[str] = typer.Option(
        None,
        "--add-expert",
        help="NAME[=DIR]: grow a built MoE (--into) by the FFN of one more dense branch of its seed (with "
        "RUN_DIR: the run's branch NAME).",
    ),
    into: Optional[Path] = typer.Option(
        None,
        "--into",
        help="With --add-expert: the moekit MoE to grow (default with RUN_DIR: RUN_DIR/tuned, else RUN_DIR/mixed).",
    ),
) -> None:
    """Merge dense branches into one Hugging Face MoE (experts = branch FFNs, the rest averaged).

    \b
    Three ways to name the inputs:
      moekit mix RUN_DIR [--out DIR]                 branches of a run directory
      moekit mix --expert code=DIR --expert math=DIR --seed-model SEED --out DIR
      moekit mix --upcycle SEED --experts 4 --out DIR   sparse upcycling baseline
    Growing a built MoE by one expert (old tensors kept byte for byte, one router row added):
      moekit mix RUN_DIR --add-expert law            (branch law of the run, into RUN_DIR/tuned, out RUN_DIR/grown)
      moekit mix --add-expert law=DIR --into MOE --out DIR --router-data law=law.jsonl --router-data code=code.jsonl
    """
    from rich.console import Console

    from moekit.commands.mix_grow import grow_from_options
    from moekit.errors import InvalidOptionError
    from moekit.steps.mix import mix
    from moekit.steps.mix.inputs import mix_sources

    options = locals()
    calibration = only_given(router_tokens=router_tokens, router_block_size=router_seq_len)
    if add_expert is not None or into is not None or router == "mean":
        grow_from_options(options, calibration, [name for name in _MIXING if name != "router"], mix_command)
        return
    if router == "zeros":
        raise InvalidOptionError(_ZEROS_REFUSAL, "Use --router random (small std) or --router centroid.")
    refuse_unused({"--experts": experts, "--drop-fraction": drop_fraction}, upcycle is not None, "--upcycle")
    refuse_unused({"--seed-model": seed_model}, bool(expert), "--expert")
    centroid_only = {
        "--router-sharpness": router_sharpness,
        "--router-tokens": router_tokens,
        "--router-seq-len": router_seq_len,
    }
    refuse_unused(centroid_only, router == "centroid", "--router centroid")
    mode, weights = _parse_average(average)
    seed_role = _seed_role(seed_as, seed_expert)
    seed, expert_list, out = mix_sources(run_dir, _parse_experts(expert), upcycle, seed_model, seed_role, out)
    upcycling = UpcycleSettings(**only_given(num_experts=experts, drop_fraction=drop_fraction)) if upcycle else None
    as_given = {name: options[name] for name in _AS_GIVEN}
    cfg = MixConfig(
        out=out,
        seed=seed,
        experts=expert_list,
        seed_as=seed_role,
        average=mode,
        weights=weights,
        upcycle=upcycling,
        router_data=parse_key_values(router_data, "--router-data"),
        **as_given,
        **calibration,
        **only_given(router_sharpness=router_sharpness, merge_density=merge_density, merge_scale=merge_scale),
    )
    _report(Console(), mix(cfg, show_progress=True))


def _seed_role(seed_as: Optional[str], seed_expert: Optional[bool]) -> str:
    """--seed-as, or its old spelling --seed-expert/--no-seed-expert; refuse a contradiction."""
    from moekit.errors import InvalidOptionError

    if seed_as is not None and seed_as not in ("routed", "shared", "none"):
        raise InvalidOptionError(f"--seed-as {seed_as} is not understood.", "Use routed, shared or none.")
    old = None if seed_expert is None else ("routed" if seed_expert else "none")
    if seed_as is not None and old is not None and old != seed_as:
        raise InvalidOptionError(
            f"--seed-as {seed_as} contradicts --{'' if seed_expert else 'no-'}seed-expert.", "Give only --seed-as."
        )
    return seed_as or old or "routed"


def _report(console: Console, result: MixResult) -> None:
    names = ", ".join(result.experts)
    console.print(
        f"[green]Wrote[/] {result.moe_type} MoE with {len(result.experts)} routed experts ({names}) to {result.out}"
    )
    shares = result.router_stats.get("init_in_domain_top1")
    if shares:
        listing = ", ".join(f"{d} {v:.0%}" for d, v in shares.items())
        console.print(f"Initial routing, share of each domain's tokens whose top-1 is its own expert: {listing}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    from moekit.modeling import MODEL_TYPE

    remote = ", trust_remote_code=True (moekit's own family)" if result.moe_type == MODEL_TYPE else ""
    console.print(
        f"Load it with AutoModelForCausalLM.from_pretrained{remote}. Its router is new: fine-tune the model "
        "(router first) before judging it."
    )
