"""The report's HTML: one file, images embedded, no scripts or styles fetched from elsewhere."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from moekit import __version__
from moekit.io.atomic import write_text_atomic
from moekit.manifest import now_iso
from moekit.run_report import figures
from moekit.run_report.gather import RunReport

# Expert colours for token-level routing (light enough for black text on top).
_PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#f4978e", "#cdb4db", "#f9c74f", "#a8dadc", "#e5989b", "#b5e48c", "#ffd6a5")

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
td.l,th.l{text-align:left}td.best{font-weight:bold;background:#e7f5e1}.note{color:#8a5a00}.small{color:#666;font-size:.85em}
img{max-width:100%;margin:.4em 0}figure{display:inline-block;margin:.3em .8em .3em 0;vertical-align:top}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #eee;padding:.5em;background:#fafafa}
.tokens span{border-radius:3px;padding:1px 0}.legend span{padding:1px 6px;margin-right:6px;border-radius:3px;font-size:.85em}
.prompt{font-weight:bold;color:#555}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are HTML already (escaped by the caller); the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _short(values: dict[str, Any], limit: int = 8) -> str:
    """A stage's params or outputs as ``key=value`` pairs (nested values summarised)."""
    parts = []
    for key, value in values.items():
        if value in (None, [], {}, ""):
            continue
        if isinstance(value, dict):
            value = "{" + ", ".join(f"{k}: {v}" for k, v in list(value.items())[:4]) + (", ..." if len(value) > 4 else "") + "}"
        elif isinstance(value, list) and len(value) > 4:
            value = f"[{', '.join(map(str, value[:4]))}, ... ({len(value)})]"
        parts.append(f"{key}={value}")
    shown = parts[:limit]
    return _e("; ".join(shown) + (f"; ... ({len(parts) - limit} more)" if len(parts) > limit else ""))


def _stages(report: RunReport) -> str:
    seed = report.manifest.seed
    shown = [s for s in report.manifest.stages if not s.stage.startswith("run:")]  # a recipe's skip markers (fingerprints) are bookkeeping
    rows = [[str(i + 1), _e(s.stage), _e(s.at), _short(s.params), _short(s.outputs)] for i, s in enumerate(shown)]
    models = [[_e(label), _e(path), _e(_experts_of(path))] for label, path in report.models.items()]
    return (f'<section id="stages"><h2>Stages and provenance</h2><p>Seed <code>{_e(seed.source)}</code> ({_e(seed.model_type)}) at '
            f'<code>{_e(seed.path)}</code>, sha256 <code>{_e(seed.sha256[:16])}</code>&hellip;; branches: '
            f'{_e(", ".join(report.manifest.branches))}. Run created {_e(report.manifest.created)}.</p>'
            + _table(["#", "stage", "when", "options", "outputs"], rows, left=5)
            + "<h3>Models</h3>" + _table(["model", "directory", "experts (from its moekit.yaml)"], models, left=3) + "</section>")


def _experts_of(path: Path) -> str:
    from moekit.provenance import expert_names

    names = expert_names(path)  # an unreadable provenance only leaves the cell empty
    return ", ".join(names) if names else "dense"


def _curves(report: RunReport) -> str:
    if not report.curves:
        return '<section id="curves"><h2>Training curves</h2><p class="note">No metrics.jsonl in the run\'s models yet.</p></section>'
    return ('<section id="curves"><h2>Training curves</h2><p class="small">From each model\'s metrics.jsonl: training loss '
            '(moving average) and the held-out loss of each domain at every evaluation.</p>'
            f'<img alt="training curves" src="{figures.training_curves(report.curves)}"/></section>')


def _evaluation(report: RunReport) -> str:
    evaluation = report.evaluation
    if evaluation is None:
        return '<section id="evaluation"><h2>Evaluation</h2><p class="note">No eval.json yet (see the notes above).</p></section>'
    columns = [*evaluation["domains"], "average"]
    compute = evaluation.get("compute", {})
    rows = []
    for model, scores in evaluation["results"].items():
        row = [_e(model)]
        for column in columns:
            best = evaluation["best"].get(column) == model
            cell = f'{scores[column]["loss"]:.4f} <span class="small">({scores[column]["perplexity"]:.1f})</span>'
            row.append(f'<td class="best">&#9733; {cell}</td>' if best else cell)
        spent = compute.get(model, {})
        row += [f"{spent['tokens']:,}" if spent.get("tokens") else "&ndash;", f"{spent['flops']:.2e}" if spent.get("flops") else "&ndash;"]
        rows.append(row)
    table = _table(["model", *(_e(c) for c in columns), "training tokens", "training FLOPs"], rows)
    return ('<section id="evaluation"><h2>Evaluation</h2><p class="small">Held-out loss (perplexity) on each domain\'s recorded '
            'held-out split; &#9733; marks the best model per column. Tokens and FLOPs: training spent beyond the seed\'s pretraining.</p>'
            f'{table}<img alt="held-out loss by model and domain" src="{figures.eval_bars(evaluation)}"/></section>')


def _names(routing: dict[str, Any]) -> list[str]:
    names = routing.get("expert_names") or []
    return [str(n) for n in names] if len(names) == routing["experts"] else [f"expert{i}" for i in range(routing["experts"])]


def _legend(names: list[str]) -> str:
    return '<p class="legend">' + "".join(f'<span style="background:{_PALETTE[i % len(_PALETTE)]}">{_e(n)}</span>' for i, n in enumerate(names)) + "</p>"


def _coloured(tokens: list[tuple[str, int | None]]) -> str:
    spans = []
    for text, expert in tokens:
        colour = _PALETTE[expert % len(_PALETTE)] if isinstance(expert, int) else "transparent"
        spans.append(f'<span style="background:{colour}">{_e(text)}</span>')
    return "".join(spans)


def _routing(report: RunReport) -> str:
    routing = report.routing
    if routing is None:
        return '<section id="routing"><h2>Routing</h2><p class="note">No routing inspection yet (see the notes above).</p></section>'
    names = _names(routing)
    domains = list(routing["domain_matrix_mean"])
    layers = routing["layers"]
    images = [figures.heatmap([routing["domain_matrix_mean"][d] for d in domains], domains, names, "domain x expert, mean over layers"),
              figures.heatmap([layer["load_fraction"] for layer in layers], [f"layer {layer['layer']}" for layer in layers], names, "expert load per layer")]
    picked = sorted({0, len(layers) // 2, len(layers) - 1})
    images += [figures.heatmap([layers[i]["domain_matrix"][d] for d in domains], domains, names, f"domain x expert, layer {layers[i]['layer']}")
               for i in picked]
    shares = _table(["domain", *(_e(n) for n in names)],
                    [[_e(d), *(f"{100 * v:.1f}%" for v in routing["domain_matrix_mean"][d])] for d in domains])
    summary = routing["summary"]
    figures_html = "".join(f'<figure><img alt="routing heatmap" src="{uri}"/></figure>' for uri in images)
    return (f'<section id="routing"><h2>Routing</h2><p>Model <code>{_e(report.routing_model)}</code>: load imbalance mean '
            f'{summary["load_imbalance_mean"]:.3f}, MaxVio mean {summary["maxvio_mean"]:.3f}, router entropy {summary["router_entropy_mean"]:.3f} '
            f'of {summary["max_router_entropy"]:.3f}, dead experts {summary["dead_experts_total"]}.</p>'
            f'<h3>Domain x expert shares</h3><p class="small">Share of each domain\'s expert assignments, mean over layers.</p>{shares}'
            f"{figures_html}</section>")


def _token_samples(report: RunReport) -> str:
    routing = report.routing
    samples = (routing or {}).get("samples") or {}
    if not samples:
        return '<section id="tokens"><h2>Token-level routing</h2><p class="note">No routing samples yet.</p></section>'
    names = _names(routing or {})
    blocks = "".join(f'<h3>{_e(d)}</h3><div class="tokens">{_coloured(list(zip(s.get("text") or [], s["top1_expert"])))}</div>'
                     for d, s in samples.items())
    return ('<section id="tokens"><h2>Token-level routing</h2><p class="small">The first held-out block of each domain, each token '
            f'on the colour of its top-1 expert at the inspected layer (as in BTX\'s Table 6).</p>{_legend(names)}{blocks}</section>')


def _generations(report: RunReport) -> str:
    if not report.generations:
        return '<section id="generations"><h2>Generations</h2><p class="note">No generations (no MoE yet, or --no-generate).</p></section>'
    parts = []
    for sample in report.generations:
        names = [str(n) for n in sample["experts"] or []]
        tokens = [(t["text"], names.index(t["expert"]) if t["expert"] in names else t["expert"]) for t in sample["tokens"]]
        parts.append(f'<h3>{_e(sample["domain"])}</h3><div class="tokens"><span class="prompt">{_e(sample["prompt"])}</span>{_coloured(tokens)}</div>')
    names = [str(n) for n in report.generations[0]["experts"] or []]
    return (f'<section id="generations"><h2>Generations</h2><p class="small">Greedy continuations by <code>{_e(report.generations[0]["model"])}</code>; '
            f'each generated token on the colour of its most frequent top expert over the layers.</p>{_legend(names)}{"".join(parts)}</section>')


def render_page(report: RunReport) -> str:
    """The whole page as a string."""
    notes = "".join(f'<li class="note">{_e(m)}</li>' for m in report.missing)
    body = (_stages(report) + _curves(report) + _evaluation(report) + _routing(report) + _token_samples(report) + _generations(report))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>moekit report: {_e(report.run_dir.name)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>moekit run report: {_e(report.run_dir.name)}</h1>"
            f'<p class="small">{_e(report.run_dir.absolute())} &middot; written {_e(now_iso())} by moekit {_e(__version__)}</p>'
            + (f"<ul>{notes}</ul>" if notes else "") + body + "</body></html>")


def write_report(report: RunReport, out: Path) -> Path:
    """Write the page atomically to ``out``; return it."""
    write_text_atomic(Path(out), render_page(report))
    return Path(out)
