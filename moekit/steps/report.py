"""``moekit report``: what a run's page shows, collected from the run directory (and a few fresh generations).

The page itself is drawn by :mod:`moekit.report.run_page`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.config import REPORT_SAMPLE_TOKENS
from moekit.data.sources import spec_paths
from moekit.errors import InvalidOptionError
from moekit.io.outputs import guard_output, write_file
from moekit.manifest import RunManifest, load_manifest
from moekit.report.run_page import RunReport, render_page
from moekit.steps.evaluate import expand_models

EVAL_FILE = "eval.json"  # written by the recipe's eval stage and by `moekit eval RUN_DIR`
ROUTING_FILE = Path("inspect") / "routing.json"  # written by the recipe's inspect stage


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (unreadable lines skipped: a run killed mid-write leaves a partial last line)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def default_prompts(run_dir: Path, manifest: RunManifest, words: int = 8) -> dict[str, str]:
    """A prompt per trained domain: the first words of its data (its held-out file where it has one)."""
    from moekit.data.sources import iter_spec_documents

    prompts = {}
    for name, record in manifest.branches.items():
        specs = record.val_data or record.data
        if not specs:
            continue
        try:
            text = next((t for t in iter_spec_documents(specs[0], "text") if t.strip()), "")
        except Exception:  # noqa: BLE001 - a prompt is a nicety; unreadable data only drops it
            continue
        prompts[name] = " ".join(text.split()[:words])
    return prompts


def generate_samples(model_dir: Path, prompts: dict[str, str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt by ``model_dir``, with each token's top expert (majority over layers)."""
    from moekit.config import GenerateConfig
    from moekit.steps.generate import Generator

    generator = Generator(GenerateConfig(model=str(model_dir), raw=True, max_new_tokens=max_new_tokens))
    samples = []
    for domain, prompt in prompts.items():
        generation = generator.generate(prompt)
        record = generation.as_dict()
        samples.append(
            {
                "domain": domain,
                "model": model_dir.name,
                "prompt": prompt,
                "experts": record["experts"],
                "tokens": [{"text": t["text"], "expert": t["expert"]} for t in record["tokens"]],
            }
        )
    return samples


def best_moe(models: dict[str, Path]) -> Path | None:
    """The model whose generations the page shows: the tuned MoE, else the mixed one."""
    for label in ("tuned", "mixed"):
        if label in models:
            return models[label]
    return None


def _stale(path: Path, inspected: dict[str, Any] | None, moe: Path) -> bool:
    """Whether the recorded inspection is missing, of another model, or older than the model's weights."""
    if inspected is None or not inspected.get("routing"):
        return True
    if Path(str(inspected.get("model", ""))).resolve() != moe.resolve():
        return True
    return path.stat().st_mtime < (moe / "config.json").stat().st_mtime


def inspect_run(run_dir: Path, manifest: RunManifest, moe: Path) -> dict[str, Any] | None:
    """Inspect ``moe``'s routing on the run's domain data (as a recipe's inspect stage does) and record it; None
    without data."""
    from moekit.config import InspectConfig
    from moekit.steps.inspect import inspect_model

    data = {name: (record.val_data or record.data)[:1] for name, record in manifest.branches.items() if record.data}
    if not data:
        return None
    trained = [
        s.params.get("seq_len")
        for s in manifest.stages
        if s.stage in ("train", "tune") and isinstance(s.params.get("seq_len"), int)
    ]
    out = run_dir / ROUTING_FILE.parent
    cfg = InspectConfig(
        model=str(moe),
        data=data,
        seq_len=trained[-1] if trained else 256,
        max_tokens=16384,
        json_path=out / ROUTING_FILE.name,
        plot_dir=out,
        force=True,  # the run's own record
    )
    return inspect_model(cfg, show_progress=False)[0]


def report_run(
    run_dir: Path,
    out: Path | None = None,
    prompts: dict[str, str] | None = None,
    generations: bool = True,
    max_new_tokens: int = REPORT_SAMPLE_TOKENS,
    inspect: bool = True,
    force: bool = False,
) -> tuple[RunReport, Path]:
    """``moekit report``: gather the run's report and write its page to ``out`` (default RUN_DIR/report.html,
    the run's own page, replaced by each report; an --out file is replaced only with ``force``)."""
    manifest = load_manifest(run_dir)  # a clear error for what is not a run, before anything is created
    target = out or Path(run_dir) / "report.html"
    if target.is_dir():
        raise InvalidOptionError(f"--out {target} is a directory.", "Give a file name, e.g. --out report.html.")
    read = [
        *expand_models([str(run_dir)]).values(),
        *spec_paths(s for r in manifest.branches.values() for s in r.data + r.val_data),
    ]
    guard_output(target, "page", force or out is None, read, run_dir)  # before minutes of inspection and generation
    report = gather_run(run_dir, prompts, generations=generations, max_new_tokens=max_new_tokens, inspect=inspect)
    return report, write_file(target, render_page(report), "page", force or out is None)


def gather_run(
    run_dir: Path,
    prompts: dict[str, str] | None = None,
    generations: bool = True,
    max_new_tokens: int = REPORT_SAMPLE_TOKENS,
    inspect: bool = True,
) -> RunReport:
    """Collect a run's report; ``prompts`` (domain -> text) default to the start of each domain's data.

    With ``inspect``, routing is inspected (and recorded in ``RUN_DIR/inspect/routing.json``) where the
    run has no inspection of its tuned (else mixed) MoE, or one older than that model.
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    models = expand_models([str(run_dir)])
    report = RunReport(run_dir, manifest, models)
    for label, directory in models.items():
        metrics = directory / "metrics.jsonl"
        if metrics.is_file():
            report.curves[label] = read_metrics(metrics)
    report.evaluation = _json_or_none(run_dir / EVAL_FILE)
    if report.evaluation is None:
        report.missing.append(f"No evaluation yet: moekit eval {run_dir} (it writes {run_dir / EVAL_FILE}).")
    moe = best_moe(models)
    inspected = _json_or_none(run_dir / ROUTING_FILE)
    if inspect and moe is not None and _stale(run_dir / ROUTING_FILE, inspected, moe):
        inspected = inspect_run(run_dir, manifest, moe) or inspected
    if inspected is not None and inspected.get("routing"):
        report.routing, report.routing_model = inspected["routing"], str(inspected.get("model", ""))
    else:
        report.missing.append(
            f"No routing inspection yet: moekit inspect {run_dir}/tuned --data DOMAIN=PATH ... --json "
            f"{run_dir / ROUTING_FILE}."
        )
    if generations and moe is not None:
        report.generations = generate_samples(moe, prompts or default_prompts(run_dir, manifest), max_new_tokens)
    elif moe is None:
        report.missing.append(f"No MoE yet: moekit mix {run_dir}.")
    return report
