"""The loop's metrics: one ``metrics.jsonl`` row per step and per evaluation (and the trackers asked for), main
process only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.train.trackers import Trackers


class MetricsLogger:
    """Append metrics rows to ``metrics.jsonl`` (and send them to the trackers asked for), main process only.

    ``name`` and ``options``: the run's name and the stage's options, given to the trackers once.
    """

    def __init__(
        self,
        work_dir: Path,
        enabled: bool,
        report_to: list[str],
        resume_step: int,
        name: str = "",
        options: dict[str, Any] | None = None,
    ) -> None:
        self.path = work_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: Trackers | None = None
        if not enabled:
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if report_to:
            self.trackers = Trackers(report_to, work_dir, name or str(work_dir), options or {})

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
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        """Close the trackers (flushing what they hold)."""
        if self.trackers is not None:
            self.trackers.finish()
