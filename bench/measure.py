"""Timing whole commands as processes, as a user waits for them: wall time and peak memory of the process tree.

Peak memory is sampled every 50 ms over the process and all its descendants (psutil): the sum
of their PSS, so pages that forked workers share with their parent count once.
"""

from __future__ import annotations

import os
import subprocess
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

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, _tree_memory(root))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - started
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return wall, peak / 2**20, output
