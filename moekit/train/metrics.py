"""The loop's metrics: one ``metrics.jsonl`` row per step and per evaluation (and TensorBoard when asked), main
process only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append metrics rows to ``metrics.jsonl`` (and TensorBoard when asked), main process only."""

    def __init__(self, work_dir: Path, enabled: bool, report_to: list[str], resume_step: int) -> None:
        self.path = work_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(work_dir / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop rows a killed run logged past its last checkpoint, so the file matches one clean run."""
        if not self.path.exists():
            return
        rows = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain 'step')."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.close()
