"""Timing whole commands as processes, as a user waits for them: wall time and peak memory of the process tree.

Peak memory is sampled (every 50 ms for the first 5 s, then every 250 ms) over the process and all its descendants
(psutil): the sum
of their PSS, so pages that forked workers share with their parent count once.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def _tree_memory(root) -> int:
    import psutil

    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


def measure(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak memory in MB of the whole process tree, output) of one whole command; raises if it fails."""
    import psutil

    # Output goes to a file, not a pipe: a pipe nobody reads until exit fills up (64 KB of
    # progress bars) and blocks the measured process forever.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        root = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, _tree_memory(root))
            except psutil.Error:
                pass
            # Every 50 ms at first, then every 250 ms: reading PSS costs CPU that the measured
            # process (on a 2-core machine) would otherwise have.
            time.sleep(0.05 if time.perf_counter() - started < 5 else 0.25)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return wall, peak / 2**20, output
