"""Settings of ``mix`` and ``mix --add-expert``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from moekit.config.base import _Calibration, _ShardedOutput, _Strict


class UpcycleSettings(_Strict):
    """Sparse upcycling: every expert starts as a copy of the seed's FFN."""

    num_experts: int = Field(4, ge=1, description="number of experts")
    drop_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="drop-upcycling: share of each expert's intermediate units re-initialised"
    )


class MixConfig(_ShardedOutput, _Calibration):
    """Everything ``mix`` needs. Exactly one of: branch ``experts`` (with ``seed``), or ``upcycle``."""

    out: Path
    seed: str = Field(description="the dense seed (directory or hub id)")
    run_dir: Path | None = Field(None, description="run directory to record the mix stage in")
    experts: list[tuple[str, Path]] = Field(default_factory=list, description="(name, directory) of each branch")
    target: str | None = Field(None, description="MoE model_type to build (default: the dense family's default target)")
    seed_as: Literal["routed", "shared", "none"] = Field(
        "routed",
        description="the seed's FFN as a routed generalist expert (BTX), as the always-on shared expert, or left out",
    )
    split: int = Field(
        1, ge=1, le=64, description="cut each expert FFN into this many experts of 1/split the width (fine-grained)"
    )
    upcycle: UpcycleSettings | None = None
    average: Literal["uniform", "weighted", "seed"] = "uniform"
    weights: list[float] | None = Field(None, description="branch weights for average=weighted")
    merge: Literal["mean", "task-arithmetic", "ties", "dare"] = Field(
        "mean",
        description="how the averaged tensors are merged: the mean of the branches, or the seed plus merged deltas",
    )
    merge_density: float = Field(1.0, gt=0.0, le=1.0, description="ties/dare: share of each branch's delta kept")
    merge_scale: float = Field(
        1.0, gt=0.0, le=10.0, description="task-arithmetic/ties/dare: multiplies the merged delta"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    top_k: int = Field(2, ge=1)
    router: Literal["random", "centroid"] = "random"
    router_std: float | None = Field(
        None,
        gt=0,
        le=0.1,
        description="std of the random router (default: initializer_range); large values saturate routing",
    )
    router_data: dict[str, str] = Field(default_factory=dict, description="domain -> data path for centroid init")
    router_sharpness: float = Field(0.5, gt=0.0, lt=1.0, description="0 = uniform, 1 = saturated initial routing")
    expert_scale: float = Field(1.0, gt=0.0, description="multiply every expert's down_proj (output scale)")
    random_seed: int = 0
    attention_experts: bool = Field(
        False, description="BAM: every source's attention becomes an attention expert (moekit's own model family)"
    )
    attention_kv: Literal["shared", "expert"] = Field(
        "shared", description="attention experts: shared (averaged) key/value projections, or one per expert"
    )
    attention_top_k: int = Field(
        0, ge=0, description="attention experts per token: 0 = soft routing over all of them (BAM's best), k = top-k"
    )

    groups: int | None = Field(
        None, ge=1, description="group-limited routing: the experts form this many groups (targets with groups)"
    )
    topk_groups: int | None = Field(None, ge=1, description="group-limited routing: groups each token may use")

    @property
    def effective_target(self) -> str | None:
        """The MoE target: the chosen one; moekit_moe for attention experts; else None (the family's default)."""
        return self.target or ("moekit_moe" if self.attention_experts else None)

    @model_validator(mode="after")
    def _consistent(self) -> MixConfig:
        """Refuse options that the chosen mode would silently ignore."""
        problems = []
        if not self.attention_experts and (self.attention_kv != "shared" or self.attention_top_k):
            problems.append("attention_kv and attention_top_k apply to attention_experts only")
        if self.attention_experts and self.upcycle is not None:
            problems.append("attention experts need branches (upcycled copies of the seed's attention are identical)")
        if self.attention_experts and self.target not in (None, "moekit_moe"):
            problems.append(
                f"attention experts exist only in moekit's own family (target moekit_moe), not {self.target}"
            )
        if (self.groups is None) != (self.topk_groups is None):
            problems.append("group-limited routing needs both groups and topk_groups (e.g. --groups 4 --topk-groups 2)")
        elif self.groups is not None and self.topk_groups is not None and self.topk_groups > self.groups:
            problems.append(f"topk_groups {self.topk_groups} is more than the {self.groups} groups")
        if self.upcycle is not None and self.seed_as == "shared":
            problems.append("seed_as shared needs branches (with upcycling every expert is already the seed's FFN)")
        if self.router != "centroid" and self.router_data:
            problems.append("router_data is only used with router=centroid")
        if self.router == "centroid" and self.router_std is not None:
            problems.append("router_std is only used with router=random")
        if self.upcycle is not None and (self.average != "uniform" or self.weights is not None):
            problems.append("average/weights do not apply to upcycling (there is one source)")
        if self.average != "weighted" and self.weights is not None:
            problems.append("weights are only used with average=weighted")
        if self.merge != "mean" and (self.upcycle is not None or self.average == "seed"):
            problems.append(
                f"merge {self.merge} combines the branches' deltas; it needs branches and average uniform or weighted"
            )
        if self.merge == "mean" and (self.merge_density != 1.0 or self.merge_scale != 1.0):
            problems.append("merge_density and merge_scale apply to merge task-arithmetic, ties or dare, not mean")
        if self.merge == "task-arithmetic" and self.merge_density != 1.0:
            problems.append("merge_density applies to ties and dare (task-arithmetic keeps every delta value)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(w < 0 for w in value) or sum(value) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        return value


class GrowConfig(_ShardedOutput, _Calibration):
    """Everything ``mix --add-expert`` needs: a built MoE, one more dense branch, and calibration data."""

    into: Path = Field(description="the moekit MoE to grow (mixed or tuned)")
    name: str = Field(min_length=1, description="the new expert's (and domain's) name")
    branch: Path = Field(description="the dense branch whose FFN becomes the new expert")
    out: Path
    run_dir: Path | None = Field(
        None, description="run directory to record the stage in (and take calibration data from)"
    )
    router_data: dict[str, str] = Field(
        default_factory=dict, description="domain -> data path: the new domain's, and at least one existing domain's"
    )
    router: Literal["calibrated", "mean"] = Field(
        "calibrated",
        description="the new router row: fitted on calibration data, or the mean of the existing rows (no data)",
    )

    @model_validator(mode="after")
    def _data_for_the_row(self) -> GrowConfig:
        if self.router == "mean" and self.router_data:
            raise ValueError("router_data is only used with the calibrated row (router mean needs no data)")
        return self
