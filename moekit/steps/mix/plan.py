"""The shape of a mixed MoE block: experts, their width, the shared expert, and the scales that keep it exact.

Three options change a block beyond "one expert per source FFN" and each must keep the
identical-branches invariant (equal branches give exactly the seed's function):

* ``--split C`` (fine-grained experts, BTX's splitting ablation): each source FFN becomes C
  experts of width d_ff/C (gate/up rows and down columns c*w:(c+1)*w), routed top-(k*C). The C
  chunks of one source share one router row, so they score equally and are chosen together;
  after renormalisation each gets 1/C of its source's weight, so the routed output is scaled by C
  (exactly: the chunks' outputs sum to the source FFN's output).
* ``--seed-as shared``: the seed's FFN becomes the always-on shared expert and the routed experts
  the branches. Routed and shared outputs are each scaled to one half: identical branches then
  give 0.5 FFN + 0.5 FFN, the seed's output. Halving is exact in every float format.
* A target whose shared expert is mandatory, without ``--seed-as shared``: the shared expert gets
  the seed's gate/up and a zero down projection, so it adds exactly nothing until trained.

A scale goes into the config where the target has a factor for it (GLM-4.5's
``routed_scaling_factor``), so expert weights are still copied bit for bit; otherwise it
multiplies the routed experts' down projections (exact for powers of two, else within one
rounding of the stored dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from moekit.arch.base import ArchAdapter
from moekit.config import MixConfig
from moekit.errors import InvalidOptionError


@dataclass(frozen=True)
class BlockPlan:
    """What every MoE block of the output holds.

    Attributes:
        sources: source FFNs (branches, plus the seed when routed).
        split: experts cut from each source FFN.
        experts: routed experts (sources x split); expert e is chunk e % split of source e // split.
        top_k: experts per token (the user's k times split).
        expert_size: each routed expert's FFN width.
        shared_size: the shared expert's FFN width (None: no shared expert).
        seed_shared: the shared expert is the seed's FFN (else: zero down projection).
        config_scale: the value of the target's routed-scale config key (1.0 where it has none).
        down_scale: factor on every routed expert's down projection (``--expert-scale`` included).
        shared_down_scale: factor on the shared expert's down projection (0: it adds nothing).
        groups: (groups, groups kept per token) of group-limited routing; None: plain top-k.
    """

    sources: int
    split: int
    experts: int
    top_k: int
    expert_size: int
    shared_size: int | None
    seed_shared: bool
    config_scale: float
    down_scale: float
    shared_down_scale: float
    groups: tuple[int, int] | None = None

    def source_of(self, expert: int) -> tuple[int, int]:
        """(source FFN, chunk) of routed expert ``expert``."""
        return divmod(expert, self.split)


def plan_block(cfg: MixConfig, adapter: ArchAdapter, sources: int, intermediate: int) -> BlockPlan:
    """The block plan for ``sources`` source FFNs of width ``intermediate``; InvalidOptionError if it cannot be
    built."""
    if intermediate % cfg.split:
        raise InvalidOptionError(
            f"--split {cfg.split} does not divide the FFN width {intermediate}.",
            f"Use a divisor of {intermediate} (e.g. {_divisor_hint(intermediate)}).",
        )
    seed_shared = cfg.seed_as == "shared" and cfg.upcycle is None
    has_shared = adapter.shared is not None and (seed_shared or adapter.shared.mandatory)
    routed_scale = float(cfg.split) * (0.5 if seed_shared else 1.0)
    config_scale = routed_scale if adapter.routed_scale_key is not None else 1.0
    weight_scale = 1.0 if adapter.routed_scale_key is not None else routed_scale
    shared_down = 0.0
    if seed_shared:
        assert adapter.shared is not None
        shared_down = 0.5 / adapter.shared.gate_value  # Qwen2-MoE's zero gate already halves: sigmoid(0) = 0.5
    experts, top_k = sources * cfg.split, cfg.top_k * cfg.split
    return BlockPlan(
        sources=sources,
        split=cfg.split,
        experts=experts,
        top_k=top_k,
        expert_size=intermediate // cfg.split,
        shared_size=intermediate if has_shared else None,
        seed_shared=seed_shared,
        config_scale=config_scale,
        down_scale=weight_scale * cfg.expert_scale,
        shared_down_scale=shared_down,
        groups=_expert_groups(cfg, adapter, experts, top_k),
    )


def _expert_groups(cfg: MixConfig, adapter: ArchAdapter, experts: int, top_k: int) -> tuple[int, int] | None:
    """``--groups G --topk-groups M``, checked against the target and the expert count."""
    if cfg.groups is None or cfg.topk_groups is None:
        return None
    if adapter.expert_group_keys is None:
        from moekit.arch import supported_targets

        with_groups = sorted({t for targets in supported_targets().values() for t in targets if _has_groups(t)})
        raise InvalidOptionError(
            f"{adapter.moe_type} has no group-limited routing: --groups does not apply to it.",
            f"Mix with --target {' or '.join(with_groups)} for expert groups, or leave out --groups/--topk-groups.",
        )
    groups, kept = cfg.groups, cfg.topk_groups
    if experts % groups or experts // groups < 2:
        divisors = [g for g in range(1, experts // 2 + 1) if experts % g == 0]
        raise InvalidOptionError(
            f"--groups {groups} cannot split {experts} routed experts into equal groups of at least 2 "
            "(a group's score is the sum of its two best experts).",
            f"Use --groups {' or '.join(map(str, divisors))} for {experts} experts.",
        )
    if top_k > kept * (experts // groups):
        raise InvalidOptionError(
            f"Top-{top_k} cannot be chosen from {kept} group(s) of {experts // groups} experts.",
            f"Raise --topk-groups to at least {-(-top_k // (experts // groups))} or lower --top-k.",
        )
    return (groups, kept)


def _has_groups(target: str) -> bool:
    from moekit.arch import adapter_for_moe

    adapter = adapter_for_moe(target)
    return adapter is not None and adapter.expert_group_keys is not None


def _divisor_hint(value: int) -> str:
    return ", ".join(str(d) for d in range(2, 17) if value % d == 0) or "1"
