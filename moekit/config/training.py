"""Settings of the training loop, ``train`` and ``tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moekit.config.base import DEFAULT_AUX_COEF, DEFAULT_CAPACITY_FACTOR, DEFAULT_TEXT_FIELD, _Strict


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
    report_to: list[Literal["tensorboard", "trackio", "wandb", "mlflow"]] = Field(
        default_factory=list, description="trackers besides metrics.jsonl (a comma-separated list is split)"
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        import importlib.util

        packages = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
        missing = [t for t in dict.fromkeys(value) if importlib.util.find_spec(packages[t]) is None]
        if missing:
            raise ValueError(
                f"report_to {', '.join(missing)} needs the package(s) {', '.join(missing)}: "
                f"pip install 'moekit[{'tensorboard' if missing == ['tensorboard'] else 'trackers'}]'"
            )
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_budget(self) -> LoopSettings:
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of max_steps or max_tokens")
        return self


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


class HyperMoESettings(_Strict):
    """HyperMoE's sizes (Zhao et al. 2024; the authors' defaults)."""

    embed_dim: int = Field(128, ge=1, le=4096, description="width of the expert embeddings and selection MLP")
    adapter_dim: int = Field(64, ge=1, le=4096, description="bottleneck width of the generated adapter")
    hyper_dim: int = Field(128, ge=1, le=4096, description="hidden width of the shared hypernetwork")


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
    train: Literal["all", "router", "router+attn", "all-but-experts", "new-expert+router", "hypermoe"] = "all"
    balance: Literal["switch", "btx", "bias", "none"] = "switch"
    aux_coef: float | None = Field(
        None, ge=0, description="balancing loss coefficient (default 0.01; 0 with balance=bias)"
    )
    hypermoe: HyperMoESettings | None = Field(
        None, description="add HyperMoE's hypernetwork before tuning (moekit_moe models; default train: hypermoe)"
    )
    z_coef: float = Field(0.0, ge=0, description="router z-loss coefficient (1e-3 when enabled)")
    balance_scope: Literal["micro", "global"] = "micro"
    bias_rate: float = Field(1e-3, gt=0, le=1, description="balance=bias: update speed u of the selection bias")
    bias_rule: Literal["sign", "proportional"] = Field(
        "sign", description="balance=bias: u*sign(mean-c) (DeepSeek-V3) or u*(mean-c)/mean"
    )
    routing: Literal["topk", "switch", "soft", "noisy", "expert_choice", "hash", "sample_top1", "sbase"] = "topk"
    router_jitter: float | None = Field(
        None, gt=0, lt=1, description="multiply the routers' input by U(1-eps, 1+eps) while training (Switch)"
    )
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
        if self.routing == "sbase":
            self._without_balancing_loss()
        if self.hypermoe is not None:
            self._hypermoe_training()
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

    def _hypermoe_training(self) -> None:
        """With hypermoe: train defaults to hypermoe (routers and HyperMoE's modules; experts frozen)."""
        if "train" not in self.model_fields_set:
            self.train = "hypermoe"
        elif self.train not in ("hypermoe", "all"):
            raise ValueError(
                f"hypermoe trains its hypernetwork, expert embeddings and routers (train hypermoe, the default) or "
                f"everything (train all); train {self.train} would leave them untrained or frozen"
            )
        if self.loop.shard == "fsdp":
            raise ValueError(
                "hypermoe is not supported with shard fsdp: its hypernetwork is shared by every layer, outside the "
                "per-layer FSDP units. Use shard none (data parallel) with hypermoe"
            )

    def _without_balancing_loss(self) -> None:
        """routing sbase balances by assignment: refuse a balancing loss asked for with it, else turn it off."""
        asked_loss = "balance" in self.model_fields_set and self.balance != "none"
        if asked_loss or ("aux_coef" in self.model_fields_set and (self.aux_coef or 0) > 0):
            raise ValueError(
                "routing sbase balances the experts by its Sinkhorn assignment; a balancing loss on top would fight "
                "it (and a selection bias would not be used). Leave out balance and aux_coef (S-BASE turns the "
                "loss off), or use balance none"
            )
        self.balance, self.aux_coef = "none", 0.0
