"""Experiment trackers the loop reports to besides ``metrics.jsonl`` (``--report-to``): TensorBoard, Trackio,
Weights & Biases, MLflow.

``metrics.jsonl`` stays the record; a tracker gets the same numeric values per step, and the run's
name and the stage's options once, at the start. Each package is imported only when asked for
(optional extras: ``pip install 'moekit[trackers]'``). A tracker that cannot start (missing
package, no credentials, a server that does not answer) or that fails later is one clear warning
on stderr and is then left out: it never ends a training run.

Where each writes, and how to keep it offline:

- ``tensorboard``: ``WORK_DIR/tensorboard``;
- ``trackio``: its local SQLite database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project ``moekit``;
- ``wandb``: project ``moekit`` (``WANDB_PROJECT`` overrides), files under ``WORK_DIR/wandb``;
  ``WANDB_MODE=offline`` writes only there (``wandb sync`` uploads later);
- ``mlflow``: experiment ``moekit``, at ``MLFLOW_TRACKING_URI`` when set (a server, or
  ``sqlite:///mlflow.db`` with the full ``mlflow`` package), else a local file store in
  ``WORK_DIR/mlruns`` (``mlflow ui --backend-store-uri WORK_DIR/mlruns`` shows it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")
PROJECT = "moekit"


class _TensorBoard:
    def __init__(self, work_dir: Path, name: str, options: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(work_dir / "tensorboard"))
        self.writer.add_text("options", "\n".join(f"{k}: {v}" for k, v in flatten(options).items()), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, work_dir: Path, name: str, options: dict[str, Any]) -> None:
        import trackio

        self.module = trackio
        trackio.init(project=PROJECT, name=name, config=flatten(options))

    def log(self, values: dict[str, float], step: int) -> None:
        self.module.log(values, step=step)

    def finish(self) -> None:
        self.module.finish()


class _Wandb:
    def __init__(self, work_dir: Path, name: str, options: dict[str, Any]) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT", PROJECT)
        self.run = wandb.init(project=project, name=name, config=options, dir=str(work_dir), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, work_dir: Path, name: str, options: dict[str, Any]) -> None:
        import mlflow

        self.module = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local file store next to metrics.jsonl: what mlflow-skinny can write without a database or server
            # (MLflow 3 keeps it but in maintenance mode, behind this opt-in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((work_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(PROJECT)
        self.run = mlflow.start_run(run_name=name)
        params = {k: str(v)[:500] for k, v in flatten(options).items()}  # MLflow caps a parameter's length
        mlflow.log_params(params)

    def log(self, values: dict[str, float], step: int) -> None:
        # MLflow refuses some characters in names ('/' is fine, '@' is not): keep letters, digits and _-./ space
        self.module.log_metrics({_mlflow_name(k): v for k, v in values.items()}, step=step)

    def finish(self) -> None:
        self.module.end_run()


_MAKERS = {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb, "mlflow": _Mlflow}


def _mlflow_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested options as ``a.b`` keys (what trackers show as a flat table)."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _warn(tracker: str, doing: str, error: BaseException) -> None:
    reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    print(
        f"warning: --report-to {tracker}: {doing} failed ({type(error).__name__}: {reason}); training goes on without "
        f"it (metrics.jsonl has every value).",
        file=sys.stderr,
        flush=True,
    )


class Trackers:
    """The trackers of one run; each one that fails is warned about once and dropped."""

    def __init__(self, report_to: list[str], work_dir: Path, name: str, options: dict[str, Any]) -> None:
        self.active: dict[str, Any] = {}
        for tracker in report_to:
            try:
                self.active[tracker] = _MAKERS[tracker](work_dir, name, options)
            except Exception as error:  # noqa: BLE001 - any tracker failure is a warning, never the run's end
                _warn(tracker, "starting", error)

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics row's numeric values (at ``row['step']``)."""
        values = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if not values:
            return
        for tracker, client in list(self.active.items()):
            try:
                client.log(values, int(row["step"]))
            except Exception as error:  # noqa: BLE001
                _warn(tracker, "logging", error)
                del self.active[tracker]

    def finish(self) -> None:
        """Close every tracker (flushing what it holds)."""
        for tracker, client in list(self.active.items()):
            try:
                client.finish()
            except Exception as error:  # noqa: BLE001
                _warn(tracker, "closing", error)
        self.active = {}
