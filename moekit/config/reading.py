"""Settings of the steps that read a model: ``inspect``, ``eval``, ``generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moekit.config.base import DEFAULT_TEXT_FIELD, _Strict


def _check_plot_dir(path: Path | None) -> Path | None:
    if path is not None and path.exists() and not path.is_dir():
        raise ValueError(f"--plot {path} is a file; give a directory for the PNG files and report.html")
    return path


class _DataPass(_Strict):
    """Domain data run through a model in blocks (``eval``, ``inspect``), and an optional JSON report."""

    data: dict[str, list[str]] = Field(default_factory=dict)
    seq_len: int = Field(512, ge=2, description="tokens per block")
    batch_size: int = Field(8, ge=1, description="blocks per forward pass")
    max_tokens: int = Field(65536, ge=1, description="tokens per domain")
    text_field: str = DEFAULT_TEXT_FIELD
    json_path: Path | None = None
    device: str | None = Field(
        None, description="cpu, cuda, cuda:N or mps (default: $MOEKIT_DEVICE, else this rank's GPU, else the CPU)"
    )
    force: bool = Field(False, description="replace an earlier --json (and --plot) output of the same kind")

    @field_validator("json_path")
    @classmethod
    def _json_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.is_dir():
            raise ValueError(f"--json {value} is a directory; give a file path such as {value / 'report.json'}")
        return value


class _Scmoe(_Strict):
    """SCMoE self-contrast decoding (``generate --scmoe``, ``eval --task ... --scmoe``)."""

    scmoe: bool = Field(False, description="self-contrast decoding (SCMoE)")
    scmoe_beta: float = Field(0.5, ge=0, description="strength: z = (1 + beta) z_strong - beta z_weak")
    scmoe_alpha: float = Field(
        0.1, gt=0, le=1, description="plausibility: only tokens with p >= alpha x the top token's p"
    )
    scmoe_rank: int = Field(2, ge=2, description="the weak pass routes each token to its expert of this rank only")


class InspectConfig(_DataPass):
    """What ``inspect`` needs: a model, optional domain data, and what to write."""

    model: str
    plot_dir: Path | None = None
    tokens: str | None = Field(None, description="domain whose first block is shown coloured by top expert")
    tokens_layer: int | None = Field(None, ge=0)

    @field_validator("plot_dir")
    @classmethod
    def _plot_directory(cls, value: Path | None) -> Path | None:
        return _check_plot_dir(value)

    @model_validator(mode="after")
    def _tokens_domain(self) -> InspectConfig:
        if self.tokens is not None and self.tokens not in self.data:
            known = ", ".join(self.data) or "none given"
            raise ValueError(f"tokens names domain '{self.tokens}', which has no --data (domains: {known})")
        if (self.tokens is not None or self.tokens_layer is not None or self.plot_dir is not None) and not self.data:
            raise ValueError("--tokens, --tokens-layer and --plot need routing data: add --data DOMAIN=PATH")
        return self


class EvalConfig(_DataPass, _Scmoe):
    """What ``eval`` needs: models, held-out data per domain, and where to write JSON."""

    models: list[str]
    task: Literal["arithmetic"] | None = Field(
        None, description="score a generation task (exact match) instead of held-out loss"
    )
    problems: int = Field(200, ge=1, description="problems of the task")
    max_new_tokens: int = Field(8, ge=1, description="tokens generated per problem")
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks (or groups)")
    tasks_dir: Path | None = Field(None, description="a folder of lm-eval task YAMLs (lm-eval's include_path)")
    task_limit: int | None = Field(None, ge=1, description="lm-eval: at most this many documents per task")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _one_kind_of_task(self) -> EvalConfig:
        if self.task is not None and self.tasks:
            raise ValueError("task (built-in arithmetic) and tasks (lm-eval) are separate evaluations; give one")
        if not self.tasks and (self.tasks_dir is not None or self.task_limit is not None):
            raise ValueError("tasks_dir and task_limit apply to lm-eval tasks: add --tasks NAMES")
        return self


class GenerateConfig(_Scmoe):
    """What ``generate`` needs: the model, decoding options, and SCMoE's settings."""

    model: str
    max_new_tokens: int = Field(128, ge=1)
    raw: bool = Field(False, description="feed the prompt as it is, without the tokenizer's chat template")
    sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample from the k most likely tokens (0: all)")
    random_seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = Field(
        None, description="cpu, cuda, cuda:N or mps (default: $MOEKIT_DEVICE, else this rank's GPU, else the CPU)"
    )
    routing_layer: int | None = Field(
        None, ge=0, description="MoE layer whose top expert is shown (None: the majority over layers)"
    )
