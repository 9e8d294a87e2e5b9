"""Typed settings for each step (pydantic, extra keys forbidden so typos in recipes fail loudly).

Every default lives here once: the commands' options take theirs from these classes
(:func:`default_of`), and so does their help text where it states one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

    @model_validator(mode="after")
    def _consistent(self) -> MixConfig:
        """Refuse options that the chosen mode would silently ignore."""
        problems = []
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


class LoopSettings(_Strict):
    """Settings of the shared training loop (``train`` and ``tune``).

    Defaults follow BTX's branch training: AdamW, weight decay 0.1, warmup then cosine decay to
    10% of the peak learning rate, gradient clipping at 1.0.
    """

    seq_len: int = Field(1024, ge=8, description="tokens per packed block")
    batch_size: int = Field(8, ge=1, description="blocks per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step per process")
    max_steps: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="alternative to max_steps: tokens to train on")
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int | None = Field(None, ge=0, description="default: min(100, max_steps // 10)")
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    shard: Literal["none", "fsdp"] = Field(
        "none", description="none: a full model per process (DDP); fsdp: FSDP2, parameters sharded"
    )
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the saved weights (auto: the input model's); the final evaluation uses them as saved",
    )
    gradient_checkpointing: bool = False
    eval_every: int = Field(100, ge=0, description="steps between evaluations (0: only at the end)")
    eval_blocks: int = Field(32, ge=1, description="held-out blocks per domain per evaluation")
    save_every: int = Field(500, ge=0, description="steps between checkpoints (0: none)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    report_to: list[Literal["tensorboard"]] = Field(default_factory=list)

    @field_validator("report_to")
    @classmethod
    def _tensorboard_installed(cls, value: list[str]) -> list[str]:
        import importlib.util

        if "tensorboard" in value and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to tensorboard needs the tensorboard package: pip install 'moekit[tensorboard]'")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> LoopSettings:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        return self


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


class TrainConfig(_Strict):
    """What ``train`` needs: the run, which branches, their data, and the loop settings."""

    run_dir: Path
    branches: list[str] = Field(default_factory=list, description="branches to train (empty: all)")
    data: dict[str, list[str]] = Field(default_factory=dict, description="branch -> data specs (remembered)")
    val_data: dict[str, list[str]] = Field(default_factory=dict, description="branch -> validation data specs")
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="share of each domain's tokens held out (default: the recorded split, else 0.05)"
    )
    text_field: str = DEFAULT_TEXT_FIELD
    train: Literal["all", "ffn", "ffn+norms"] = Field(
        "all",
        description="what learns: everything, only the FFNs (the rest stays the seed's, FlexOlmo-style), or "
        "FFNs and norms",
    )
    device: str | None = Field(
        None, description="cpu, cuda, cuda:N or mps (default: $MOEKIT_DEVICE, else this rank's GPU, else the CPU)"
    )
    resume: bool = False
    loop: LoopSettings


class TuneConfig(_Strict):
    """What ``tune`` needs: the mixed MoE, domain data and mixture, what trains, how to balance."""

    model: Path = Field(description="the MoE directory written by mix")
    out: Path
    run_dir: Path | None = Field(None, description="run directory to record the stage in")
    data: dict[str, list[str]] = Field(description="domain -> data specs")
    val_data: dict[str, list[str]] = Field(default_factory=dict)
    mixture: dict[str, float] = Field(
        default_factory=dict, description="domain -> share of the tune data (default equal)"
    )
    train: Literal["all", "router", "router+attn", "all-but-experts", "new-expert+router"] = "all"
    balance: Literal["switch", "btx", "bias", "none"] = "switch"
    aux_coef: float | None = Field(
        None, ge=0, description="balancing loss coefficient (default 0.01; 0 with balance=bias)"
    )
    z_coef: float = Field(0.0, ge=0, description="router z-loss coefficient (1e-3 when enabled)")
    balance_scope: Literal["micro", "global"] = "micro"
    bias_rate: float = Field(1e-3, gt=0, le=1, description="balance=bias: update speed u of the selection bias")
    bias_rule: Literal["sign", "proportional"] = Field(
        "sign", description="balance=bias: u*sign(mean-c) (DeepSeek-V3) or u*(mean-c)/mean"
    )
    routing: Literal["topk", "switch", "soft", "noisy", "expert_choice", "hash", "sample_top1"] = "topk"
    capacity_factor: float | None = Field(
        None,
        gt=0,
        description="switch: capacity = tokens / E x this (default 1.5); expert_choice: tokens x top_k / E x "
        "this (default 1.0)",
    )
    temperature: tuple[float, float] = Field(
        (1.0, 0.5), description="sample_top1: Gumbel temperature at the start and the end (linear)"
    )
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="share of each domain's tokens held out (default: the recorded split, else 0.05)"
    )
    text_field: str = DEFAULT_TEXT_FIELD
    device: str | None = Field(
        None, description="cpu, cuda, cuda:N or mps (default: $MOEKIT_DEVICE, else this rank's GPU, else the CPU)"
    )
    resume: bool = False
    force: bool = False
    stage: str = Field("tune", description="the run-manifest stage name (baselines tune under their own)")
    loop: LoopSettings

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if not self.data:
            raise ValueError("tune needs data: give --data DOMAIN=PATH for each domain")
        if self.mixture and set(self.mixture) != set(self.data):
            raise ValueError(
                f"the mixture names {sorted(self.mixture)} but the data has domains {sorted(self.data)}; name "
                "the same domains"
            )
        if any(v < 0 for v in self.mixture.values()) or (self.mixture and sum(self.mixture.values()) <= 0):
            raise ValueError("mixture shares must be non-negative with a positive sum")
        if self.balance_scope == "global" and self.balance != "switch":
            raise ValueError(
                "balance_scope global changes the assignment counts of the switch loss; it has no effect with balance="
                + self.balance
            )
        if self.aux_coef is None:
            self.aux_coef = 0.0 if self.balance == "bias" else DEFAULT_AUX_COEF
        if self.capacity_factor is None:
            self.capacity_factor = DEFAULT_CAPACITY_FACTOR[
                "expert_choice" if self.routing == "expert_choice" else "switch"
            ]
        elif self.routing not in ("switch", "expert_choice"):
            raise ValueError("capacity_factor only applies with routing switch or expert_choice")
        if self.balance == "bias" and self.routing != "topk":
            raise ValueError(
                f"balance bias moves the model's own top-k selection; routing {self.routing} replaces it while "
                "training. "
                "Use routing topk with balance bias"
            )
        if min(self.temperature) <= 0:
            raise ValueError("temperature values must be positive")
        unused_val = sorted(set(self.val_data) - set(self.data))
        if unused_val:
            raise ValueError(f"val_data names {unused_val} without data for them; give --data for those domains too")
        return self


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
