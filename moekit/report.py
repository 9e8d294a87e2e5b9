"""Rendering reports: rich tables in the terminal, PNG heatmaps and a self-contained HTML page.

Everything here takes the plain-data reports the steps return (the same dicts written as JSON),
so the terminal, the JSON and the HTML never disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

_COLOURS = ("red", "green", "blue", "magenta", "cyan", "yellow", "bright_red", "bright_green", "bright_blue", "bright_magenta")


def _names(routing: dict[str, Any]) -> list[str]:
    names = routing.get("expert_names") or []
    return [names[e] if e < len(names) else f"e{e}" for e in range(routing["experts"])]


def render_static(console: Any, static: dict[str, Any], detail: bool) -> None:
    """Architecture and parameter counts, and per-layer router norms / expert similarity."""
    from rich.table import Table

    arch = ", ".join(static.get("architectures") or [static["model_type"]])
    line = f"[bold]{arch}[/]: {static['layers']} layers, hidden {static['hidden_size']}, {static['total_params']:,} parameters"
    if static["is_moe"]:
        active = f"{static['active_params']:,}" if "active_params" in static else "unknown"
        line += f"; {static['experts']} experts, top-{static['top_k']}, {active} active per token"
    console.print(line)
    if static.get("note"):
        console.print(f"[yellow]{static['note']}[/]")
    if static.get("selection_bias"):
        console.print(f"Selection bias (e_score_correction_bias, chooses experts but not their weights): |b| up to {static['selection_bias']['abs_max']:.4f}")
    layers = static.get("per_layer") or []
    if not layers:
        return
    table = Table(title="router and experts per layer (static)")
    for column in ("layer", "router row norms", "mean expert cosine", "expert drift (1 - mean cosine)"):
        table.add_column(column)
    shown = layers if detail or len(layers) <= 8 else layers[:4] + layers[-4:]
    for layer in shown:
        table.add_row(str(layer["layer"]), " ".join(f"{v:.3f}" for v in layer["router_row_norms"]),
                      f"{layer['mean_expert_cosine']:.4f}", " ".join(f"{v:.4f}" for v in layer["expert_drift"]))
    console.print(table)


def render_routing(console: Any, routing: dict[str, Any], detail: bool) -> None:
    """Load summary per layer, dead experts (loudly), and the domain x expert routing matrix."""
    from rich.table import Table

    names = _names(routing)
    summary = routing["summary"]
    seen = ", ".join(f"{domain} ({info['tokens']:,} tokens)" for domain, info in routing["domains"].items())
    console.print(f"Routing over {seen}: "
                  f"load imbalance mean {summary['load_imbalance_mean']:.2f} / max {summary['load_imbalance_max']:.2f}, "
                  f"MaxVio mean {summary['maxvio_mean']:.2f}, router entropy {summary['router_entropy_mean']:.3f} of {summary['max_router_entropy']:.3f}")
    if "changed_by_bias_mean" in summary:
        console.print(f"The selection bias changed the experts of {summary['changed_by_bias_mean']:.1%} of tokens "
                      "(against top-k of the unbiased scores), mean over layers.")
    if "shared_output_share_mean" in summary:
        console.print(f"The shared expert gives {summary['shared_output_share_mean']:.1%} of the MoE output "
                      "(|shared| / (|shared| + |routed|) per token, mean over tokens and layers).")
    if summary["dead_experts_total"]:
        dead = "; ".join(f"layer {l['layer']}: {', '.join(names[e] for e in l['dead_expert_ids'])}" for l in routing["layers"] if l["dead_expert_ids"])
        console.print(f"[bold red]DEAD EXPERTS[/] (no token routed to them): {dead}")
    table = Table(title="load per layer")
    for column in ("layer", "imbalance", "MaxVio", "CV", "eff. experts", "dead", "router entropy", "router z"):
        table.add_column(column, justify="right")
    if detail:
        for name in names:
            table.add_column(f"{name} % (gate %)", justify="right")
    for layer in routing["layers"]:
        row = [str(layer["layer"]), f"{layer['load_imbalance']:.2f}", f"{layer['maxvio']:.2f}", f"{layer['cv']:.2f}",
               f"{layer['effective_experts']:.2f}", str(layer["dead_experts"]), f"{layer['router_entropy']:.3f}", f"{layer['router_z']:.2f}"]
        if detail:  # selection share, and in brackets the share of gate weight the expert received
            row += [f"{100 * v:.1f} ({100 * g:.1f})" for v, g in zip(layer["load_fraction"], layer.get("gate_fraction", layer["load_fraction"]))]
        table.add_row(*row)
    console.print(table)
    _render_domain_matrix(console, "domain x expert share (mean over layers)", routing["domain_matrix_mean"], names)
    if detail:
        for layer in routing["layers"]:
            _render_domain_matrix(console, f"layer {layer['layer']}: domain x expert share", layer["domain_matrix"], names)
    if routing.get("in_domain_share"):
        console.print("In-domain share (tokens routed to the expert named after their domain): "
                      + ", ".join(f"{d} {v:.0%}" for d, v in routing["in_domain_share"].items()))


def _render_domain_matrix(console: Any, title: str, matrix: dict[str, list[float]], names: list[str]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("domain")
    for name in names:
        table.add_column(name, justify="right")
    for domain, shares in matrix.items():
        table.add_row(domain, *(f"{100 * v:.1f}%" for v in shares))
    console.print(table)


def render_tokens(console: Any, routing: dict[str, Any], domain: str, layer: int | None) -> None:
    """A domain's first block with each token coloured by its top-1 expert."""
    from rich.text import Text

    names = _names(routing)
    sample = routing["samples"][domain]
    text = Text()
    for piece, expert in zip(sample["text"], sample["top1_expert"]):
        text.append(piece, style=_COLOURS[expert % len(_COLOURS)])
    where = f"layer {layer}" if layer is not None else "the middle layer"
    console.print(f"[bold]{domain}[/], top-1 expert per token at {where}:  ", _legend(names))
    console.print(text)


def _legend(names: list[str]) -> Any:
    """The expert names, each in its colour."""
    from rich.text import Text

    legend = Text("  ".join(f"{n}" for n in names))
    for i, name in enumerate(names):
        legend.stylize(_COLOURS[i % len(_COLOURS)], sum(len(n) + 2 for n in names[:i]), sum(len(n) + 2 for n in names[:i]) + len(name))
    return legend


def render_generation_routing(console: Any, generation: Any, layer: int | None) -> None:
    """The generated text with each token coloured by its top expert (in ``layer``, or the majority over layers)."""
    from rich.text import Text

    if not generation.expert_names:
        console.print("(a dense model: no routing to show)")
        return
    text = Text()
    for token in generation.tokens:
        expert = token.top_expert(layer)
        text.append(token.text, style=_COLOURS[expert % len(_COLOURS)] if expert is not None else "")
    where = f"layer {layer}" if layer is not None else f"the majority over {generation.moe_layers} MoE layers"
    console.print(f"top expert per generated token ({where}):  ", _legend(generation.expert_names))
    console.print(text)


def _heatmap(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(columns), 1.0 + 0.35 * len(rows)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG heatmaps (layer x expert load; domain x expert, mean and per layer) and report.html."""
    routing = report["routing"]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _names(routing)
    domains = list(routing["domain_matrix_mean"])
    layer_rows = [f"layer {l['layer']}" for l in routing["layers"]]
    paths = [
        _heatmap([l["load_fraction"] for l in routing["layers"]], layer_rows, names, "load fraction per layer", out_dir / "load.png"),
        _heatmap([routing["domain_matrix_mean"][d] for d in domains], domains, names, "domain x expert (mean over layers)", out_dir / "domains_mean.png"),
    ]
    for layer in routing["layers"]:
        matrix = [layer["domain_matrix"][d] for d in domains]
        paths.append(_heatmap(matrix, domains, names, f"domain x expert, layer {layer['layer']}", out_dir / f"domains_layer{layer['layer']:02d}.png"))
    paths.append(_write_html(report, paths, out_dir / "report.html"))
    return paths


def _table_html(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _write_html(report: dict[str, Any], images: list[Path], path: Path) -> Path:
    routing, static = report["routing"], report["static"]
    summary = routing["summary"]
    layers = _table_html(
        ["layer", "imbalance", "MaxVio", "CV", "effective experts", "dead", "router entropy", "router z"],
        [[l["layer"], f"{l['load_imbalance']:.3f}", f"{l['maxvio']:.3f}", f"{l['cv']:.3f}", f"{l['effective_experts']:.2f}",
          l["dead_experts"], f"{l['router_entropy']:.3f}", f"{l['router_z']:.2f}"] for l in routing["layers"]],
    )
    figures = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"/></figure>' for p in images
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moekit inspect: {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:0.5em}}.dead{{color:#b00;font-weight:bold}}</style></head><body>
<h1>Routing report</h1><p>{html.escape(report['model'])}: {html.escape(', '.join(static.get('architectures') or []))},
{static['experts']} experts, top-{static['top_k']}, {static['total_params']:,} parameters ({static.get('active_params', 'unknown')} active).</p>
<p>Load imbalance mean {summary['load_imbalance_mean']:.3f} (max {summary['load_imbalance_max']:.3f}), MaxVio mean {summary['maxvio_mean']:.3f},
router entropy {summary['router_entropy_mean']:.3f} of {summary['max_router_entropy']:.3f}.</p>
{'<p class="dead">Dead experts in layers ' + ', '.join(map(str, summary['layers_with_dead_experts'])) + '</p>' if summary['dead_experts_total'] else ''}
<h2>Per layer</h2>{layers}<h2>Figures</h2>{figures}</body></html>"""
    path.write_text(page, encoding="utf-8")
    return path


def render_eval_table(console: Any, report: dict[str, Any]) -> None:
    """Held-out loss (perplexity) per model and domain, best per column marked, and each row's training compute."""
    from rich.table import Table

    from moekit.train.compute import format_flops

    table = Table(title="held-out loss (perplexity); * = best")
    table.add_column("model")
    columns = [*report["domains"], "average"]
    for column in columns:
        table.add_column(column, justify="right")
    compute = report.get("compute") or {}
    if compute:
        table.add_column("train tokens", justify="right")
        table.add_column("train FLOPs", justify="right")
    for label, scores in report["results"].items():
        cells = [f"{scores[c]['loss']:.3f} ({scores[c]['perplexity']:.1f}){' *' if report['best'][c] == label else ''}" for c in columns]
        if compute:
            spent = compute.get(label)
            cells += [f"{spent['tokens']:,}", format_flops(spent["flops"])] if spent else ["", ""]
        table.add_row(label, *cells)
    console.print(table)
    if compute:
        console.print("train tokens / FLOPs: training beyond the seed (model FLOPs, moekit.train.compute); dense is matched on "
                      "tokens and upcycled on FLOPs to tuned (branches + tune).")
    if not report.get("same_tokenizer", True):
        console.print("[yellow]The models use different tokenizers: losses per token are not directly comparable across them.[/]")


def render_run_outcome(console: Any, outcome: Any) -> None:
    """What a recipe run did, its eval table and a routing summary."""
    console.print("stages: " + ", ".join(f"{stage} {what.split(' ')[0]}" for stage, what in outcome.stages.items()))
    if outcome.eval_report:
        render_eval_table(console, outcome.eval_report)
    if outcome.routing and outcome.routing.get("routing"):
        render_routing(console, outcome.routing["routing"], detail=False)
        console.print(f"Routing plots and report: {outcome.workdir / 'run' / 'inspect' / 'report.html'}")


def render_task_table(console: Any, report: dict[str, Any]) -> None:
    """Exact-match accuracy per model on a generation task: greedy, and with SCMoE where it was scored."""
    from rich.table import Table

    with_scmoe = report.get("scmoe") is not None
    table = Table(title=f"{report['task']}: exact-match accuracy on {report['problems']} held-out problems")
    table.add_column("model")
    table.add_column("greedy", justify="right")
    if with_scmoe:
        settings = report["scmoe"]
        table.add_column(f"SCMoE (beta {settings['beta']}, alpha {settings['alpha']}, rank {settings['rank']})", justify="right")
    for label, scores in report["results"].items():
        cells = [f"{scores['greedy']:.1%}"]
        if with_scmoe:
            cells.append(f"{scores['scmoe']:.1%}" if scores["scmoe"] is not None else "-")
        table.add_row(label, *cells)
    console.print(table)
