"""The run manifest round-trips, and newer or broken manifests are refused clearly."""

import pytest
import yaml

from moekit.errors import ManifestError
from moekit.manifest import (
    MANIFEST_VERSION,
    BranchRecord,
    RunManifest,
    SeedRecord,
    StageRecord,
    load_manifest,
    save_manifest,
)


def _manifest():
    return RunManifest(
        seed=SeedRecord(source="org/model", path="/seed", sha256="ab" * 32, model_type="llama"),
        branches={"code": BranchRecord(path="branches/code")},
        stages=[StageRecord(stage="branch", params={"domains": ["code"]})],
    )


def test_roundtrip(tmp_path):
    save_manifest(tmp_path, _manifest())
    loaded = load_manifest(tmp_path)
    assert loaded == _manifest().model_copy(update={"created": loaded.created, "stages": loaded.stages})
    assert loaded.branch_dir(tmp_path, "code") == tmp_path / "branches/code"


def test_newer_version_refused(tmp_path):
    data = _manifest().model_dump(mode="json")
    data["manifest_version"] = MANIFEST_VERSION + 1
    (tmp_path / "moekit.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match="newer moekit"):
        load_manifest(tmp_path)


def test_unknown_key_refused(tmp_path):
    data = _manifest().model_dump(mode="json")
    data["branchs"] = {}
    (tmp_path / "moekit.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError, match="branchs"):
        load_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not a moekit run directory"):
        load_manifest(tmp_path)
