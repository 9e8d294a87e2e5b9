"""The launcher tier: whole recipe runs under ``launcher: local`` and on a real one-node Slurm cluster started by
the tests; skipped unless MOEKIT_LAUNCHER_TESTS=1 (minutes of processes, too long for the fast suite).

``.ci/run`` installs Debian's ``slurm-wlm`` and ``munge`` and sets ``MOEKIT_LAUNCHER_TESTS=1``. With the
variable set, missing programs (or not being root, which slurmd needs) fail the Slurm tests instead of
skipping them, so CI cannot pass without them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.launchers.cluster import OneNodeSlurm, missing_programs

LAUNCHER_TESTS_ENV = "MOEKIT_LAUNCHER_TESTS"


def launcher_tests_enabled() -> bool:
    """Whether the launcher tier runs (MOEKIT_LAUNCHER_TESTS=1)."""
    return os.environ.get(LAUNCHER_TESTS_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``launchers``; skip them unless the tier is enabled."""
    skip = pytest.mark.skip(
        reason=f"launcher tier: set {LAUNCHER_TESTS_ENV}=1 (the Slurm tests need slurm-wlm, munge and root)"
    )
    for item in items:
        if "tests/launchers/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.launchers)
            if not launcher_tests_enabled():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneNodeSlurm]:
    """A one-node Slurm cluster for the session (its daemons stopped at the end)."""
    missing = missing_programs()
    assert not missing, f"the Slurm tier needs {', '.join(missing)}: apt-get install slurm-wlm munge"
    assert os.geteuid() == 0, "the Slurm tier runs slurmd, which needs root"
    cluster = OneNodeSlurm(Path(tmp_path_factory.mktemp("slurm")))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster: OneNodeSlurm, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's environment points Slurm's commands at the test cluster."""
    for key, value in slurm_cluster.env().items():
        monkeypatch.setenv(key, value)
    return {**os.environ}
