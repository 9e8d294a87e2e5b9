"""``inspect --plot DIR``: PNG heatmaps of a routing report, and report.html with them and the per-layer table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moekit.report import figures
from moekit.report.html import esc, figure, page, table, write_page
from moekit.report.tables import expert_labels


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG heatmaps (layer x expert load; domain x expert, mean and per layer) and report.html; return the paths
    written."""
    routing = report["routing"]
    names = expert_labels(routing)
    domains = list(routing["domain_matrix_mean"])
    layer_rows = [f"layer {layer['layer']}" for layer in routing["layers"]]
    drawn = [
        ([layer["load_fraction"] for layer in routing["layers"]], layer_rows, "load fraction per layer", "load.png"),
        (
            [routing["domain_matrix_mean"][d] for d in domains],
            domains,
            "domain x expert (mean over layers)",
            "domains_mean.png",
        ),
    ]
    for layer in routing["layers"]:
        drawn.append(
            (
                [layer["domain_matrix"][d] for d in domains],
                domains,
                f"domain x expert, layer {layer['layer']}",
                f"domains_layer{layer['layer']:02d}.png",
            )
        )
    attention = routing.get("attention")
    if attention:  # mix --attention-experts: where each domain's tokens put their largest attention-expert weight
        drawn.append(
            (
                [attention["domain_matrix_mean"][d] for d in domains],
                domains,
                "domain x attention expert (top weight, mean over layers)",
                "attention_domains_mean.png",
            )
        )
        drawn.append(
            (
                [layer["gate_fraction"] for layer in attention["layers"]],
                [f"layer {layer['layer']}" for layer in attention["layers"]],
                "attention-expert gate mass per layer",
                "attention_gate_mass.png",
            )
        )
    paths = [
        figures.heatmap_file(
            matrix, rows, expert_labels(attention) if "attention" in name else names, title, out_dir / name
        )
        for matrix, rows, title, name in drawn
    ]
    paths.append(write_page(out_dir / "report.html", _page(report, paths)))
    return paths


def _page(report: dict[str, Any], images: list[Path]) -> str:
    routing, static = report["routing"], report["static"]
    summary = routing["summary"]
    layers = table(
        ["layer", "imbalance", "MaxVio", "CV", "effective experts", "dead", "router entropy", "router z"],
        [
            [
                str(layer["layer"]),
                f"{layer['load_imbalance']:.3f}",
                f"{layer['maxvio']:.3f}",
                f"{layer['cv']:.3f}",
                f"{layer['effective_experts']:.2f}",
                str(layer["dead_experts"]),
                f"{layer['router_entropy']:.3f}",
                f"{layer['router_z']:.2f}",
            ]
            for layer in routing["layers"]
        ],
    )
    dead = (
        f'<p class="dead">Dead experts in layers {esc(", ".join(map(str, summary["layers_with_dead_experts"])))}</p>'
        if summary["dead_experts_total"]
        else ""
    )
    body = (
        f"<p>{esc(report['model'])}: {esc(', '.join(static.get('architectures') or []))}, {static['experts']} experts, "
        f"top-{static['top_k']}, {static['total_params']:,} parameters "
        f"({esc(static.get('active_params', 'unknown'))} active).</p>"
        f"<p>Load imbalance mean {summary['load_imbalance_mean']:.3f} (max "
        f"{summary['load_imbalance_max']:.3f}), MaxVio mean "
        f"{summary['maxvio_mean']:.3f}, router entropy {summary['router_entropy_mean']:.3f} of "
        f"{summary['max_router_entropy']:.3f}.</p>"
        f"{dead}<h2>Per layer</h2>{layers}<h2>Figures</h2>"
        + "".join(figure(figures.file_uri(p), p.stem) for p in images)
    )
    return page(f"moekit inspect: {report['model']}", "Routing report", body)
