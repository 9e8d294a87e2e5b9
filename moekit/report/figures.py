"""The reports' charts, drawn with matplotlib: PNG data URIs for a page that stays one file, or PNG files (``inspect
--plot``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

_DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _data_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average (training loss is noisy per step)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_curves(curves: dict[str, list[dict[str, Any]]]) -> str:
    """One panel per trained model: training loss (smoothed) and held-out loss per domain against the step."""
    plt = _pyplot()
    labels = list(curves)
    columns = min(3, len(labels))
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        train = [r for r in curves[label] if isinstance(r.get("loss"), (int, float))]
        if train:
            steps = [r["step"] for r in train]
            ax.plot(
                steps,
                _smoothed([r["loss"] for r in train], max(1, len(train) // 20)),
                color="0.35",
                label="train (smoothed)",
            )
        domains = sorted({k.split("/")[1] for r in curves[label] for k in r if k.startswith("eval/")})
        for i, domain in enumerate(domains):
            points = [(r["step"], r[f"eval/{domain}/loss"]) for r in curves[label] if f"eval/{domain}/loss" in r]
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "o-",
                color=f"C{i}",
                markersize=4,
                label=f"held-out {domain}",
            )
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _data_uri(fig)


def eval_bars(evaluation: dict[str, Any]) -> str:
    """Grouped bars: held-out loss of every model on every domain and on average (lower is better)."""
    plt = _pyplot()
    models = list(evaluation["results"])
    columns = [*evaluation["domains"], "average"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) * max(1, len(models) / 3)), 3.6))
    for i, model in enumerate(models):
        values = [evaluation["results"][model][c]["loss"] for c in columns]
        ax.bar(
            [x + (i - (len(models) - 1) / 2) * width for x in range(len(columns))],
            values,
            width,
            label=model,
            color=f"C{i % 10}",
        )
    low = min(evaluation["results"][m][c]["loss"] for m in models for c in columns)
    high = max(evaluation["results"][m][c]["loss"] for m in models for c in columns)
    ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9) - 0.05), high + 0.05 * (high - low + 1e-9) + 0.02)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("held-out loss (lower is better)")
    ax.legend(fontsize=7, ncol=min(4, len(models)), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def _heatmap_figure(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, percent: bool) -> Any:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * len(columns), 1.0 + 0.38 * len(rows)))
    top = max((v for row in matrix for v in row), default=1.0) or 1.0
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            text = f"{100 * value:.0f}" if percent else f"{value:.2f}"
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color="black" if value > 0.6 * top else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title + (" (% of the row's assignments)" if percent else ""), fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def heatmap(matrix: list[list[float]], rows: list[str], columns: list[str], title: str, percent: bool = True) -> str:
    """A heatmap with each cell's value written in it (percent of the row, by default), as a data URI."""
    return _data_uri(_heatmap_figure(matrix, rows, columns, title, percent))


def heatmap_file(
    matrix: list[list[float]], rows: list[str], columns: list[str], title: str, path: Path, percent: bool = True
) -> Path:
    """The same heatmap written to ``path`` as a PNG file; return ``path``."""
    fig = _heatmap_figure(matrix, rows, columns, title, percent)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def file_uri(path: Path) -> str:
    """A PNG file as a data URI (for embedding it in a page)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()
