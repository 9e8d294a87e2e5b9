"""The ``launcher`` section of a recipe: where ``moekit run`` runs its stages.

``inline`` runs every stage in the ``moekit run`` process, one after another (the default).
``local`` runs independent stages (the branches' trainings; the two baselines) as concurrent
processes on this machine, each with its share of the GPUs or of the CPU threads. ``slurm``
submits one Slurm job per stage, with ``afterok`` dependencies between them, so the branches train
at the same time on as many nodes as the cluster gives. Only where the stages run changes: the
stages, their options and their fingerprints are the same under every launcher, so a run started
under one continues under another.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STAGE_KINDS = ("seed", "branch", "train", "mix", "average", "tune", "dense", "upcycle", "eval", "inspect")
# Stages whose work is the training loop: they run under torchrun when a job has several processes.
DISTRIBUTED_KINDS = frozenset({"train", "tune", "dense", "upcycle"})

_MEMORY = re.compile(r"^\d+[KMGT]?$")
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (or UNLIMITED).
_TIME = re.compile(r"^(UNLIMITED|INFINITE|\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JobResources(_Strict):
    """What one Slurm job asks for; unset keys fall back to the section above (stage -> kind -> slurm)."""

    nodes: int | None = Field(None, ge=1, description="nodes (stages that train; the others run on one)")
    gpus_per_node: int | None = Field(None, ge=0)
    processes_per_node: int | None = Field(
        None, ge=1, description="processes per node under torchrun (default: gpus_per_node, or 1)"
    )
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs of each node's task")
    mem: str | None = Field(None, description="memory per node, e.g. 64G")
    time: str | None = Field(None, description="time limit, e.g. 04:00:00 or 2-00:00:00")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: list[str] | None = Field(None, description="more sbatch options, e.g. ['--constraint=a100']")

    @field_validator("mem", "time", mode="before")
    @classmethod
    def _number_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # mem: 32000 is MB

    @field_validator("mem")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.match(value):
            raise ValueError(f"mem {value!r} is not a Slurm memory size (e.g. 64G, 500M, 32000)")
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not _TIME.match(value):
            raise ValueError(f"time {value!r} is not a Slurm time limit (e.g. 90, 04:00:00, 2-00:00:00)")
        return value

    @field_validator("extra")
    @classmethod
    def _options(cls, value: list[str] | None) -> list[str] | None:
        for option in value or []:
            if not option.startswith("-") or "\n" in option:
                raise ValueError(f"extra option {option!r} is not one sbatch option (e.g. --constraint=a100)")
        return value


class SlurmSpec(JobResources):
    """Slurm: the resources of every job, overrides per stage kind or stage, and how a job starts."""

    stages: dict[str, JobResources] = Field(
        default_factory=dict, description="per stage kind (train, mix, ...) or stage (train:code)"
    )
    setup: list[str] = Field(
        default_factory=list,
        description="shell lines run first in each job (module load ..., source VENV/bin/activate)",
    )
    python: str | None = Field(None, description="the Python on the nodes (default: the one running moekit run)")
    requeue: bool = Field(True, description="a job stopped before its time limit, or preempted, is requeued")
    signal_seconds: int = Field(
        300, ge=0, description="seconds before the time limit at which a training job checkpoints and requeues (0: no)"
    )

    def for_stage(self, stage: str) -> JobResources:
        """The resources of ``stage`` (e.g. ``train:code``): its own entry over its kind's over the defaults."""
        merged = JobResources.model_validate(self.model_dump(include=set(JobResources.model_fields)))
        for key in (stage.split(":")[0], stage) if ":" in stage else (stage,):
            override = self.stages.get(key)
            if override is not None:
                merged = merged.model_copy(update=override.model_dump(exclude_none=True))
        return merged


class LocalSpec(_Strict):
    """This machine: how many stages at once, and each one's share of it."""

    max_parallel: int | None = Field(
        None, ge=1, description="jobs at a time (default: the GPUs / gpus_per_job, or min(4, CPU cores))"
    )
    gpus_per_job: int | None = Field(None, ge=0, description="GPUs of a training job (default: 1 when there are GPUs)")
    processes_per_job: int | None = Field(
        None, ge=1, description="processes of a training job under torchrun (default: gpus_per_job, or 1)"
    )
    threads_per_job: int | None = Field(None, ge=1, description="CPU threads of a job (default: cores / max_parallel)")


class LauncherSpec(_Strict):
    """Where the stages run (see the module docstring)."""

    kind: Literal["inline", "local", "slurm"] = "inline"
    wait: bool = Field(True, description="slurm: follow the jobs until they end (false: submit and return)")
    poll_seconds: float = Field(5.0, gt=0, le=600, description="how often the jobs' states are read while waiting")
    progress_every: float = Field(10.0, ge=0, description="seconds between the progress lines of a job's log")
    local: LocalSpec = Field(default_factory=LocalSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)

    def check_stage_names(self, domains: list[str]) -> None:
        """Every key of ``slurm.stages`` names a stage kind or a domain's train stage; raise ValueError if not."""
        known = set(STAGE_KINDS) | {f"train:{d}" for d in domains}
        unknown = sorted(set(self.slurm.stages) - known)
        if unknown:
            raise ValueError(
                f"launcher.slurm.stages has unknown stage {', '.join(unknown)}; use a stage kind "
                f"({', '.join(STAGE_KINDS)}) or train:DOMAIN"
            )
