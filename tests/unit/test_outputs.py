"""What the output guard recognises as moekit's own (and so what --force may replace)."""

from pathlib import Path

import pytest
import yaml

from moekit.errors import OutputExistsError
from moekit.io.outputs import guard_output, recognise


def _model(path: Path, provenance: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    if provenance:
        (path / "moekit.yaml").write_text(yaml.safe_dump({"stage": "mix", "moekit_version": "0.1.0"}))
    return path


def test_a_users_project_with_a_recipe_file_is_not_a_work_directory(tmp_path):
    project = tmp_path / "proj"
    _model(project / "hf-llama")
    (project / "recipe.yaml").write_text(yaml.safe_dump({"recipe_version": 1, "name": "x", "workdir": "out"}))
    assert recognise(project) is None and recognise(project / "hf-llama") is None
    with pytest.raises(OutputExistsError):
        guard_output(project / "hf-llama", "model", force=True)


def test_a_work_directory_is_recognised_by_its_marker_or_its_recipe_as_run(tmp_path):
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / ".moekit-workdir").write_text("x")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "recipe.yaml").write_text(yaml.safe_dump({"recipe_version": 1, "workdir": str(legacy.resolve())}))
    assert recognise(marked) == recognise(legacy) == "workdir"
    assert recognise(_model(legacy / "seed")) == "model"  # a model a recipe built


def test_a_directory_with_a_routing_json_is_not_a_plot_directory(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "routing.json").write_text('{"model": "m", "static": {}, "routing": null}')
    (results / "notes.txt").write_text("mine")
    assert recognise(results) is None
    with pytest.raises(OutputExistsError):
        guard_output(results, "plots", force=True)


def test_models_branches_and_strangers(tmp_path):
    assert recognise(_model(tmp_path / "made", provenance=True)) == "model"
    assert recognise(_model(tmp_path / "downloaded")) is None
    config = _model(tmp_path / "other") / "config.json"
    assert recognise(config) is None
    with pytest.raises(OutputExistsError):
        guard_output(config, "eval report", force=True)


def test_waiting_lock_makes_the_second_process_wait_and_leaves_nothing(tmp_path):
    """Two processes preparing one cache entry: the second waits for the first, and no lock file is left."""
    import multiprocessing
    import time

    from moekit.io.locks import waiting_lock

    lock, log = tmp_path / "cache" / ".entry.lock", tmp_path / "order.txt"

    def hold(name: str, seconds: float) -> None:
        with waiting_lock(lock):
            with open(log, "a") as handle:
                handle.write(f"{name} in\n")
            time.sleep(seconds)
            with open(log, "a") as handle:
                handle.write(f"{name} out\n")

    first = multiprocessing.get_context("fork").Process(target=hold, args=("first", 1.0))
    first.start()
    while not log.exists():
        time.sleep(0.01)
    hold("second", 0)
    first.join()
    assert log.read_text().split("\n")[:4] == ["first in", "first out", "second in", "second out"]
    assert not lock.exists()
