"""``moekit report``: one self-contained HTML page for a run directory.

:mod:`.gather` collects what the run recorded (manifest stages, metrics.jsonl curves, eval.json,
inspect/routing.json) and a few fresh generations; :mod:`.figures` draws the charts (PNG, embedded
as data URIs); :mod:`.page` writes the HTML. Nothing on the page is fetched from elsewhere.
"""

from moekit.run_report.gather import RunReport, gather_run
from moekit.run_report.page import write_report

__all__ = ["RunReport", "gather_run", "write_report"]
