"""Typed settings for each step (pydantic, extra keys forbidden so typos in recipes fail loudly)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpcycleSettings(_Strict):
    """Sparse upcycling: every expert starts as a copy of the seed's FFN."""

    num_experts: int = Field(ge=1, description="number of experts")
    drop_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="drop-upcycling: share of each expert's intermediate units re-initialised"
    )


class MixConfig(_Strict):
    """Everything ``mix`` needs. Exactly one of: branch ``experts`` (with ``seed``), or ``upcycle``."""

    out: Path
    seed: str = Field(description="the dense seed (directory or hub id)")
    run_dir: Path | None = Field(None, description="run directory to record the mix stage in")
    experts: list[tuple[str, Path]] = Field(default_factory=list, description="(name, directory) of each branch")
    seed_expert: bool = Field(True, description="add the seed's FFN as a generalist expert (BTX)")
    upcycle: UpcycleSettings | None = None
    average: Literal["uniform", "weighted", "seed"] = "uniform"
    weights: list[float] | None = Field(None, description="branch weights for average=weighted")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    top_k: int = Field(2, ge=1)
    router: Literal["random", "centroid"] = "random"
    router_std: float | None = Field(
        None, gt=0, le=0.1, description="std of the random router (default: initializer_range); large values saturate routing"
    )
    router_data: dict[str, str] = Field(default_factory=dict, description="domain -> data path for centroid init")
    router_sharpness: float = Field(0.5, gt=0.0, lt=1.0, description="0 = uniform, 1 = saturated initial routing")
    router_tokens: int = Field(8192, ge=16, description="calibration tokens per domain for centroid init")
    router_block_size: int = Field(256, ge=8, description="calibration sequence length")
    expert_scale: float = Field(1.0, gt=0.0, description="multiply every expert's down_proj (output scale)")
    random_seed: int = 0
    shard_size: str = "2GB"
    force: bool = False

    @field_validator("shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        from moekit.io.writer import parse_size

        parse_size(value)  # raises ValueError with the accepted forms
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MixConfig:
        """Refuse options that the chosen mode would silently ignore."""
        problems = []
        if self.router != "centroid" and self.router_data:
            problems.append("router_data is only used with router=centroid")
        if self.router == "centroid" and self.router_std is not None:
            problems.append("router_std is only used with router=random")
        if self.upcycle is not None and (self.average != "uniform" or self.weights is not None):
            problems.append("average/weights do not apply to upcycling (there is one source)")
        if self.average != "weighted" and self.weights is not None:
            problems.append("weights are only used with average=weighted")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("weights")
    @classmethod
    def _positive_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(w < 0 for w in value) or sum(value) <= 0):
            raise ValueError("weights must be non-negative with a positive sum")
        return value
