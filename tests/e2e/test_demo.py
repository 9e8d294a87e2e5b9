"""The README's main command: the demo pipeline runs and its checks pass."""

from moekit.steps.demo import run_demo


def test_demo_pipeline(tmp_path):
    result = run_demo(tmp_path / "demo", steps=12, show_progress=False)
    assert result.checks["BTX mix loads in transformers, no missing/unexpected keys"] == "yes"
    diff = float(result.checks["upcycled MoE (4 equal experts) reproduces the seed"].split()[-1])
    assert diff < 1e-5
    losses = result.losses
    assert set(losses) == {"seed", "branch code", "branch math", "BTX mix (untuned)", "BTX mix, tuned"}
    assert "MaxVio" in result.checks["tune balanced the experts"]
    assert losses["branch code"]["code"] < losses["seed"]["code"]  # training on a domain helps it
    assert losses["branch math"]["math"] < losses["seed"]["math"]
    assert (tmp_path / "demo" / "run" / "mixed" / "config.json").is_file()


def test_eval_of_a_run_directory_uses_its_held_out_splits(tmp_path):
    from moekit.config import EvalConfig
    from moekit.steps.evaluate import evaluate_models

    run_demo(tmp_path / "demo", steps=6, show_progress=False)
    report = evaluate_models(EvalConfig(models=[str(tmp_path / "demo" / "run")], seq_len=64), show_progress=False)
    assert list(report["results"]) == ["seed", "branch code", "branch math", "mixed", "tuned"]
    assert report["domains"] == ["code", "math"] and report["same_tokenizer"]
