"""Reports in the terminal: rich tables and coloured text.

Everything here takes the plain-data reports the steps return (the same dicts written as JSON,
drawn by :mod:`moekit.report.figures` and :mod:`moekit.report.html`), so the terminal, the JSON
and the HTML never disagree.
"""

from __future__ import annotations

from typing import Any

_COLOURS = (
    "red",
    "green",
    "blue",
    "magenta",
    "cyan",
    "yellow",
    "bright_red",
    "bright_green",
    "bright_blue",
    "bright_magenta",
)


def expert_labels(routing: dict[str, Any]) -> list[str]:
    """A routing report's expert names, one per expert (``eN`` where the report names none)."""
    names = routing.get("expert_names") or []
    return [str(names[e]) if e < len(names) else f"e{e}" for e in range(routing["experts"])]


def render_static(console: Any, static: dict[str, Any], detail: bool) -> None:
    """Architecture and parameter counts, and per-layer router norms / expert similarity."""
    from rich.table import Table

    arch = ", ".join(static.get("architectures") or [static["model_type"]])
    line = (
        f"[bold]{arch}[/]: {static['layers']} layers, hidden {static['hidden_size']}, "
        f"{static['total_params']:,} parameters"
    )
    if static["is_moe"]:
        active = f"{static['active_params']:,}" if "active_params" in static else "unknown"
        line += f"; {static['experts']} experts, top-{static['top_k']}, {active} active per token"
    console.print(line)
    if static.get("note"):
        console.print(f"[yellow]{static['note']}[/]")
    if static.get("selection_bias"):
        console.print(
            "Selection bias (e_score_correction_bias, chooses experts but not their weights): |b| up to "
            f"{static['selection_bias']['abs_max']:.4f}"
        )
    layers = static.get("per_layer") or []
    if not layers:
        return
    table = Table(title="router and experts per layer (static)")
    for column in ("layer", "router row norms", "mean expert cosine", "expert drift (1 - mean cosine)"):
        table.add_column(column)
    shown = layers if detail or len(layers) <= 8 else layers[:4] + layers[-4:]
    for layer in shown:
        table.add_row(
            str(layer["layer"]),
            " ".join(f"{v:.3f}" for v in layer["router_row_norms"]),
            f"{layer['mean_expert_cosine']:.4f}",
            " ".join(f"{v:.4f}" for v in layer["expert_drift"]),
        )
    console.print(table)


def render_routing(console: Any, routing: dict[str, Any], detail: bool) -> None:
    """Load summary per layer, dead experts (loudly), and the domain x expert routing matrix."""

    names = expert_labels(routing)
    summary = routing["summary"]
    seen = ", ".join(f"{domain} ({info['tokens']:,} tokens)" for domain, info in routing["domains"].items())
    console.print(
        f"Routing over {seen}: "
        f"load imbalance mean {summary['load_imbalance_mean']:.2f} / max {summary['load_imbalance_max']:.2f}, "
        f"MaxVio mean {summary['maxvio_mean']:.2f}, router entropy {summary['router_entropy_mean']:.3f} of "
        f"{summary['max_router_entropy']:.3f}"
    )
    if "changed_by_bias_mean" in summary:
        console.print(
            f"The selection bias changed the experts of {summary['changed_by_bias_mean']:.1%} of tokens "
            "(against top-k of the unbiased scores), mean over layers."
        )
    if "shared_output_share_mean" in summary:
        console.print(
            f"The shared expert gives {summary['shared_output_share_mean']:.1%} of the MoE output "
            "(|shared| / (|shared| + |routed|) per token, mean over tokens and layers)."
        )
    if summary["dead_experts_total"]:
        dead = "; ".join(
            f"layer {l['layer']}: {', '.join(names[e] for e in l['dead_expert_ids'])}"
            for l in routing["layers"]
            if l["dead_expert_ids"]
        )
        console.print(f"[bold red]DEAD EXPERTS[/] (no token routed to them): {dead}")
    console.print(_load_table(routing, names, detail))
    _render_domain_matrix(console, "domain x expert share (mean over layers)", routing["domain_matrix_mean"], names)
    if detail:
        for layer in routing["layers"]:
            _render_domain_matrix(
                console, f"layer {layer['layer']}: domain x expert share", layer["domain_matrix"], names
            )
    if routing.get("in_domain_share"):
        console.print(
            "In-domain share (tokens routed to the expert named after their domain): "
            + ", ".join(f"{d} {v:.0%}" for d, v in routing["in_domain_share"].items())
        )
    if routing.get("attention"):
        how = (
            "soft routing: every attention expert runs; load counts each token at its largest-weight expert"
            if routing["attention"]["soft"]
            else "top-k routing"
        )
        console.print(f"\n[bold]Attention experts[/] ({how})")
        render_routing(console, routing["attention"], detail)


def _load_table(routing: dict[str, Any], names: list[str], detail: bool) -> Any:
    """The per-layer load table (with ``detail``, every expert's selection and gate shares)."""
    from rich.table import Table

    table = Table(title="load per layer")
    for column in ("layer", "imbalance", "MaxVio", "CV", "eff. experts", "dead", "router entropy", "router z"):
        table.add_column(column, justify="right")
    if detail:
        for name in names:
            table.add_column(f"{name} % (gate %)", justify="right")
    for layer in routing["layers"]:
        row = [
            str(layer["layer"]),
            f"{layer['load_imbalance']:.2f}",
            f"{layer['maxvio']:.2f}",
            f"{layer['cv']:.2f}",
            f"{layer['effective_experts']:.2f}",
            str(layer["dead_experts"]),
            f"{layer['router_entropy']:.3f}",
            f"{layer['router_z']:.2f}",
        ]
        if detail:  # selection share, and in brackets the share of gate weight the expert received
            row += [
                f"{100 * v:.1f} ({100 * g:.1f})"
                for v, g in zip(layer["load_fraction"], layer.get("gate_fraction", layer["load_fraction"]))
            ]
        table.add_row(*row)
    return table


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

    names = expert_labels(routing)
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
        legend.stylize(
            _COLOURS[i % len(_COLOURS)],
            sum(len(n) + 2 for n in names[:i]),
            sum(len(n) + 2 for n in names[:i]) + len(name),
        )
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


def render_eval_table(console: Any, report: dict[str, Any]) -> None:
    """Held-out loss (perplexity) per model and domain, best per column marked, and each row's training compute."""
    from rich.table import Table

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
        cells = [
            f"{scores[c]['loss']:.3f} ({scores[c]['perplexity']:.1f}){' *' if report['best'][c] == label else ''}"
            for c in columns
        ]
        if compute:
            spent = compute.get(label)
            cells += [f"{spent['tokens']:,}", format_flops(spent["flops"])] if spent else ["", ""]
        table.add_row(label, *cells)
    console.print(table)
    if compute:
        console.print(
            "train tokens / FLOPs: training beyond the seed (model FLOPs, moekit.train.compute); dense is matched on "
            "tokens and upcycled on FLOPs to tuned (branches + tune)."
        )
    if not report.get("same_tokenizer", True):
        console.print(
            "[yellow]The models use different tokenizers: losses per token are not directly comparable across them.[/]"
        )


def render_harness_table(console: Any, harness: dict[str, Any]) -> None:
    """lm-evaluation-harness scores: a row per model (and SCMoE variant), a column per task metric (value +- stderr)."""
    from rich.table import Table

    columns = []
    for scores in harness["results"].values():
        for task, result in scores.items():
            for metric in result["metrics"]:
                if (task, metric) not in columns:
                    columns.append((task, metric))
    table = Table(title="lm-evaluation-harness (value +- stderr; n = documents)")
    table.add_column("model", justify="left")
    for task, metric in columns:
        table.add_column(f"{task}\n{metric}", justify="right")
    for label, scores in harness["results"].items():
        cells = []
        for task, metric in columns:
            found = scores.get(task, {}).get("metrics", {}).get(metric)
            if found is None:
                cells.append("-")
                continue
            stderr = f" +- {found['stderr']:.3f}" if found["stderr"] is not None else ""
            cells.append(f"{found['value']:.3f}{stderr} (n {scores[task]['n']})")
        table.add_row(label, *cells)
    console.print(table)


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
        table.add_column(
            f"SCMoE (beta {settings['beta']}, alpha {settings['alpha']}, rank {settings['rank']})", justify="right"
        )
    for label, scores in report["results"].items():
        cells = [f"{scores['greedy']:.1%}"]
        if with_scmoe:
            cells.append(f"{scores['scmoe']:.1%}" if scores["scmoe"] is not None else "-")
        table.add_row(label, *cells)
    console.print(table)


def format_flops(flops: float) -> str:
    """1.23e15 -> '1.23 PFLOP' (SI prefixes)."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"


_STATE_STYLE = {"done": "green", "running": "cyan", "failed": "red", "cancelled": "red", "not run": "red"}


def render_run_status(console: Any, status: Any) -> None:
    """``moekit status``: a row per stage (state, job, step / total, loss, tokens/s, ETA, log), then the details of
    the stages that have any (why pending, how failed)."""
    from rich.markup import escape
    from rich.table import Table

    logs = status.workdir / "jobs" / "logs"
    wide = console.width >= 100  # else the log column goes: the caption says where the logs are
    caption = f"logs: {logs}" + ("" if wide else "/STAGE.log (train:code -> train-code.log)")
    table = Table(title=f"{status.recipe}: {status.workdir} (launcher {status.launcher})", caption=caption)
    for name in ("stage", "state", "job", "step", "loss", "tok/s", "ETA") + (("log",) if wide else ()):
        table.add_column(name, justify="left" if name in ("stage", "state", "log") else "right", no_wrap=True)
    for stage in status.stages:
        progress = stage.progress
        step = f"{progress['done']}/{progress['total']}" if progress else ""
        state = f"[{_STATE_STYLE.get(stage.state, 'yellow')}]{escape(stage.state)}[/]"
        eta = progress.get("ETA", "") if stage.state == "running" else ""  # an ended job's last ETA means nothing
        log = stage.log.name if stage.log else ""
        cells = [stage.stage, state, stage.job_id, step, progress.get("loss", ""), progress.get("tok/s", ""), eta, log]
        table.add_row(*cells[: len(table.columns)])
    console.print(table)
    for stage in status.stages:
        if stage.detail:
            console.print(f"{escape(stage.stage)}: {escape(stage.detail)}", soft_wrap=True)
    if status.scheduler_note:
        console.print(f"[yellow]{escape(status.scheduler_note)}[/]")


def render_launch_outcome(console: Any, outcome: Any) -> None:
    """What a launched run did: the failures with their logs' last lines, then the eval and routing summary."""
    from rich.markup import escape

    if not outcome.waited:
        submitted = [s.stage for s in outcome.statuses if s.state not in ("done", "to run")]
        console.print(
            f"{len(submitted)} stage(s) submitted. Follow them with: moekit status {outcome.run.workdir}; a failed or "
            "cancelled stage is run again by running the recipe again."
        )
        return
    if not outcome.failures:
        render_run_outcome(console, outcome.run)
        return
    console.print("stages: " + ", ".join(f"{s.stage} {s.state}" for s in outcome.statuses))
    for stage, what in outcome.failures.items():
        console.print(f"[bold red]{escape(stage)}[/]: {escape(what)}", soft_wrap=True)
    console.print(
        "[yellow]fix:[/] see the logs under "
        f"{escape(str(outcome.run.workdir / 'jobs' / 'logs'))}; running the recipe again starts only what is "
        "unfinished (trainings resume from their checkpoints)."
    )
