"""bench/device_check.py, the one-command check of every GPU path, runs on the CPU too: so it cannot rot."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_device_check_passes_on_the_cpu(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "device_check.py"),
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--json",
            str(tmp_path / "check.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) == 6 and all(line.startswith("PASS") for line in lines), result.stdout
    for part in ("dense bf16 training (plain)", "FSDP2", "grouped_mm vs eager", "centroid", "KV cache", "resumed"):
        assert any(part in line for line in lines), (part, result.stdout)
