"""``moekit report``'s page for a run: stages, curves, evaluation, routing, token-level routing, generations.

:func:`moekit.steps.report.gather_run` fills a :class:`RunReport` from the run directory; this
module only draws it (through :mod:`moekit.report.html` and :mod:`moekit.report.figures`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.manifest import RunManifest
from moekit.provenance import expert_names
from moekit.report import figures
from moekit.report.html import PALETTE, esc, figure, page, table, write_page
from moekit.report.tables import expert_labels, format_flops


@dataclass
class RunReport:
    """Everything on the page. Optional parts are None (or empty) where the run has not made them yet."""

    run_dir: Path
    manifest: RunManifest
    models: dict[str, Path]  # eval's row labels -> directories
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # label -> metrics.jsonl rows
    evaluation: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None  # inspect's "routing" report, with "model"
    routing_model: str | None = None
    # each {domain, model, prompt, tokens: [{text, expert}], experts}
    generations: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what the run lacks, with the command that makes it


def _human(key: str, value: Any) -> str:
    """One value for people: FLOPs with an SI prefix, other floats to 4 significant digits, large integers grouped,
    dicts and long lists summarised."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float) and "flops" in key:
        return format_flops(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, dict):
        shown = ", ".join(f"{k}: {_human(str(k), v)}" for k, v in list(value.items())[:4])
        return "{" + shown + (", ..." if len(value) > 4 else "") + "}"
    if isinstance(value, list):
        shown = ", ".join(_human(key, v) for v in value[:4])
        return f"[{shown}" + (f", ... ({len(value)})]" if len(value) > 4 else "]")
    return str(value)


def _short(values: dict[str, Any], limit: int = 8) -> str:
    """A stage's params or outputs, one ``key: value`` per line (numbers rounded, nested values summarised)."""
    parts = [f"{key}: {_human(key, value)}" for key, value in values.items() if value not in (None, [], {}, "")]
    shown = [esc(part) for part in parts[:limit]]
    if len(parts) > limit:
        shown.append(f"... ({len(parts) - limit} more)")
    return "<br>".join(shown)


def _stages(report: RunReport) -> str:
    seed = report.manifest.seed
    shown = [
        s for s in report.manifest.stages if not s.stage.startswith("run:")
    ]  # a recipe's skip markers (fingerprints) are bookkeeping
    rows = [[str(i + 1), esc(s.stage), esc(s.at), _short(s.params), _short(s.outputs)] for i, s in enumerate(shown)]
    models = [[esc(label), esc(path), esc(_experts_of(path))] for label, path in report.models.items()]
    return (
        f'<section id="stages"><h2>Stages and provenance</h2><p>Seed <code>{esc(seed.source)}</code> '
        f"({esc(seed.model_type)}) at "
        f"<code>{esc(seed.path)}</code>, sha256 <code>{esc(seed.sha256[:16])}</code>&hellip;; branches: "
        f"{esc(', '.join(report.manifest.branches))}. Run created {esc(report.manifest.created)}.</p>"
        + table(["#", "stage", "when", "options", "outputs"], rows, left=5)
        + "<h3>Models</h3>"
        + table(["model", "directory", "experts (from its moekit.yaml)"], models, left=3)
        + "</section>"
    )


def _experts_of(path: Path) -> str:
    names = expert_names(path)  # an unreadable provenance only leaves the cell empty
    return ", ".join(names) if names else "dense"


def _curves(report: RunReport) -> str:
    if not report.curves:
        return (
            '<section id="curves"><h2>Training curves</h2><p class="note">No metrics.jsonl in the run\'s '
            "models yet.</p></section>"
        )
    return (
        '<section id="curves"><h2>Training curves</h2><p class="small">From each model\'s metrics.jsonl: training loss '
        "(moving average) and the held-out loss of each domain at every evaluation.</p>"
        f'<img alt="training curves" src="{figures.training_curves(report.curves)}"/></section>'
    )


def _evaluation(report: RunReport) -> str:
    evaluation = report.evaluation
    if evaluation is None:
        return (
            '<section id="evaluation"><h2>Evaluation</h2><p class="note">No eval.json yet (see the notes '
            "above).</p></section>"
        )
    columns = [*evaluation["domains"], "average"]
    compute = evaluation.get("compute", {})
    rows = []
    for model, scores in evaluation["results"].items():
        row = [esc(model)]
        for column in columns:
            best = evaluation["best"].get(column) == model
            cell = f'{scores[column]["loss"]:.4f} <span class="small">({scores[column]["perplexity"]:.1f})</span>'
            row.append(f'<td class="best">&#9733; {cell}</td>' if best else cell)
        spent = compute.get(model, {})
        row += [
            f"{spent['tokens']:,}" if spent.get("tokens") else "&ndash;",
            f"{spent['flops']:.2e}" if spent.get("flops") else "&ndash;",
        ]
        rows.append(row)
    scores_table = table(["model", *(esc(c) for c in columns), "training tokens", "training FLOPs"], rows)
    return (
        '<section id="evaluation"><h2>Evaluation</h2><p class="small">Held-out loss (perplexity) on each '
        "domain's recorded "
        "held-out split; &#9733; marks the best model per column. Tokens and FLOPs: training spent beyond the "
        "seed's pretraining.</p>"
        f'{scores_table}<img alt="held-out loss by model and domain" src="{figures.eval_bars(evaluation)}"/>'
        f"{_harness(evaluation.get('harness'))}</section>"
    )


def _harness(harness: dict[str, Any] | None) -> str:
    """lm-evaluation-harness scores (``moekit eval RUN_DIR --tasks ...``): a row per model, a column per metric."""
    if not harness:
        return ""
    columns: list[tuple[str, str]] = []
    for scores in harness["results"].values():
        columns += [(t, m) for t, r in scores.items() for m in r["metrics"] if (t, m) not in columns]
    rows = []
    for model, scores in harness["results"].items():
        row = [esc(model)]
        for task, metric in columns:
            found = scores.get(task, {}).get("metrics", {}).get(metric)
            stderr = f" &plusmn; {found['stderr']:.3f}" if found and found["stderr"] is not None else ""
            row.append(f"{found['value']:.3f}{stderr}" if found else "&ndash;")
        rows.append(row)
    header = ["model", *(f"{esc(t)}<br>{esc(m)}" for t, m in columns)]
    return "<h3>lm-evaluation-harness</h3>" + table(header, rows)


def _legend(names: list[str]) -> str:
    return (
        '<p class="legend">'
        + "".join(f'<span style="background:{PALETTE[i % len(PALETTE)]}">{esc(n)}</span>' for i, n in enumerate(names))
        + "</p>"
    )


def _coloured(tokens: list[tuple[str, int | None]]) -> str:
    spans = []
    for text, expert in tokens:
        colour = PALETTE[expert % len(PALETTE)] if isinstance(expert, int) else "transparent"
        spans.append(f'<span style="background:{colour}">{esc(text)}</span>')
    return "".join(spans)


def _routing(report: RunReport) -> str:
    routing = report.routing
    if routing is None:
        return (
            '<section id="routing"><h2>Routing</h2><p class="note">No routing inspection yet (see the notes '
            "above).</p></section>"
        )
    names = expert_labels(routing)
    domains = list(routing["domain_matrix_mean"])
    layers = routing["layers"]
    images = [
        figures.heatmap(
            [routing["domain_matrix_mean"][d] for d in domains], domains, names, "domain x expert, mean over layers"
        ),
        figures.heatmap(
            [layer["load_fraction"] for layer in layers],
            [f"layer {layer['layer']}" for layer in layers],
            names,
            "expert load per layer",
        ),
    ]
    picked = sorted({0, len(layers) // 2, len(layers) - 1})
    images += [
        figures.heatmap(
            [layers[i]["domain_matrix"][d] for d in domains],
            domains,
            names,
            f"domain x expert, layer {layers[i]['layer']}",
        )
        for i in picked
    ]
    shares = table(
        ["domain", *(esc(n) for n in names)],
        [[esc(d), *(f"{100 * v:.1f}%" for v in routing["domain_matrix_mean"][d])] for d in domains],
    )
    summary = routing["summary"]
    figures_html = "".join(figure(uri, "routing heatmap") for uri in images)
    return (
        f'<section id="routing"><h2>Routing</h2><p>Model <code>{esc(report.routing_model)}</code>: load imbalance mean '
        f"{summary['load_imbalance_mean']:.3f}, MaxVio mean {summary['maxvio_mean']:.3f}, router entropy "
        f"{summary['router_entropy_mean']:.3f} "
        f"of {summary['max_router_entropy']:.3f}, dead experts {summary['dead_experts_total']}.</p>"
        '<h3>Domain x expert shares</h3><p class="small">Share of each domain\'s expert assignments, mean over '
        f"layers.</p>{shares}"
        f"{figures_html}</section>"
    )


def _token_samples(report: RunReport) -> str:
    routing = report.routing
    samples = (routing or {}).get("samples") or {}
    if not samples:
        return '<section id="tokens"><h2>Token-level routing</h2><p class="note">No routing samples yet.</p></section>'
    names = expert_labels(routing or {})
    blocks = "".join(
        f'<h3>{esc(d)}</h3><div class="tokens">{_coloured(list(zip(s.get("text") or [], s["top1_expert"])))}</div>'
        for d, s in samples.items()
    )
    return (
        '<section id="tokens"><h2>Token-level routing</h2><p class="small">The first held-out block of each '
        "domain, each token "
        "on the colour of its top-1 expert at the inspected layer (as in BTX's Table "
        f"6).</p>{_legend(names)}{blocks}</section>"
    )


def _generations(report: RunReport) -> str:
    if not report.generations:
        return (
            '<section id="generations"><h2>Generations</h2><p class="note">No generations (no MoE yet, or '
            "--no-generate).</p></section>"
        )
    parts = []
    for sample in report.generations:
        names = [str(n) for n in sample["experts"] or []]
        tokens = [
            (t["text"], names.index(t["expert"]) if t["expert"] in names else t["expert"]) for t in sample["tokens"]
        ]
        parts.append(
            f'<h3>{esc(sample["domain"])}</h3><div class="tokens"><span '
            f'class="prompt">{esc(sample["prompt"])}</span>{_coloured(tokens)}</div>'
        )
    names = [str(n) for n in report.generations[0]["experts"] or []]
    return (
        '<section id="generations"><h2>Generations</h2><p class="small">Greedy continuations by '
        f"<code>{esc(report.generations[0]['model'])}</code>; "
        "each generated token on the colour of its most frequent top expert over the "
        f"layers.</p>{_legend(names)}{''.join(parts)}</section>"
    )


def render_page(report: RunReport) -> str:
    """The whole page as a string."""
    notes = "".join(f'<li class="note">{esc(m)}</li>' for m in report.missing)
    body = (f"<ul>{notes}</ul>" if notes else "") + (
        _stages(report)
        + _curves(report)
        + _evaluation(report)
        + _routing(report)
        + _token_samples(report)
        + _generations(report)
    )
    return page(
        f"moekit report: {report.run_dir.name}",
        f"moekit run report: {report.run_dir.name}",
        body,
        esc(report.run_dir.absolute()),
    )


def write_report(report: RunReport, out: Path) -> Path:
    """Write the page atomically to ``out``; return it."""
    return write_page(out, render_page(report))
