"""The settings shared by several steps: constants, the strict base class, output and calibration bases."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_TEXT_FIELD = "text"  # the text field of .jsonl/.json/.parquet records
DEFAULT_AUX_COEF = 0.01  # the balancing loss coefficient (0 with balance=bias)
DEFAULT_Z_COEF = 1e-3  # the router z-loss coefficient when the z-loss is on
DEFAULT_CAPACITY_FACTOR = {"switch": 1.5, "expert_choice": 1.0}  # by training-time routing
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: $MOEKIT_DEVICE, else this process's GPU, else the CPU)"
REPORT_SAMPLE_TOKENS = 24  # the length of each generation sample of `moekit report`


def default_of(config: type[BaseModel], name: str) -> Any:
    """The default of field ``name`` of ``config`` (for a command's option and its help text)."""
    return config.model_fields[name].get_default(call_default_factory=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf or nan in an option is always a mistake


class _ShardedOutput(_Strict):
    """A step that writes a model directory in safetensors shards."""

    shard_size: str = Field("2GB", description="largest shard file, e.g. 500MB or 5GB")
    force: bool = False

    @field_validator("shard_size")
    @classmethod
    def _valid_size(cls, value: str) -> str:
        from moekit.io.writer import parse_size

        parse_size(value)  # raises ValueError with the accepted forms
        return value


class _Calibration(_Strict):
    """Calibration data for a router initialisation (``mix --router centroid``, ``mix --add-expert``)."""

    router_tokens: int = Field(8192, ge=16, description="calibration tokens per domain")
    router_block_size: int = Field(256, ge=8, description="calibration sequence length")
