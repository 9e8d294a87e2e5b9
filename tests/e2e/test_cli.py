"""The installed console script, end to end, as a user runs it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_clean_load, load

MOEKIT = shutil.which("moekit", path=str(Path(sys.executable).parent)) or "moekit"


def _run(*args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([MOEKIT, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_branch_then_mix_through_the_console_script(make_seed, tmp_path):
    seed = make_seed("llama")
    _run("branch", seed, tmp_path / "run", "--domain", "code", "--domain", "math")
    result = _run("mix", tmp_path / "run", "--top-k", "2")
    assert "experts (code, math, seed)" in result.stdout.replace("\n", " ")
    moe, info = load(tmp_path / "run" / "mixed")
    assert_clean_load(info)
    dense, _ = load(seed)
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, atol=1e-5)
    upcycled = _run("mix", "--upcycle", seed, "--experts", "4", "--out", tmp_path / "up")
    assert upcycled.returncode == 0
    assert load(tmp_path / "up")[0].config.num_local_experts == 4


def test_user_error_exit_code_and_no_traceback(tmp_path):
    result = _run("mix", tmp_path / "not-a-run", check=False)
    assert result.returncode == 2
    assert "not a moekit run directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["branch"], ["mix"], ["demo"]])
def test_help_does_not_import_heavy_libraries(command):
    code = (
        "import sys\n"
        "from moekit.cli import main\n"
        f"sys.argv = ['moekit', *{command!r}, '--help']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("LIGHT"), result.stdout[-300:]
