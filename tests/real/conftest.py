"""The real-model and reader tiers: skipped unless MOEKIT_REAL_TESTS=1 (``.ci/run`` sets it)."""

from __future__ import annotations

import pytest

from tests.assets import REAL_TESTS_ENV, real_tests_enabled


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``real``; skip them unless the tier is enabled."""
    skip = pytest.mark.skip(
        reason=f"real-model tier: set {REAL_TESTS_ENV}=1 (builds cached assets, see tests/assets.py)"
    )
    for item in items:
        if "tests/real/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.real)
            if not real_tests_enabled():
                item.add_marker(skip)
