"""The one HTML writer of moekit's reports (``moekit report``'s run page, ``inspect --plot``'s routing page).

A page is one file: styles inline, images embedded as PNG data URIs, no scripts, nothing fetched
from elsewhere, so it can be mailed, archived or opened offline. Cell and text values are
escaped here (:func:`esc`); callers pass HTML only where they built it themselves.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from moekit import __version__
from moekit.io.atomic import write_text_atomic
from moekit.manifest import now_iso

# Expert colours for token-level routing (light enough for black text on top).
PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#f4978e", "#cdb4db", "#f9c74f", "#a8dadc", "#e5989b", "#b5e48c", "#ffd6a5")

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}
td.l,th.l{text-align:left}td.best{font-weight:bold;background:#e7f5e1}.note{color:#8a5a00}.small{color:#666;font-size:.85em}
img{max-width:100%;margin:.4em 0}figure{display:inline-block;margin:.3em .8em .3em 0;vertical-align:top}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #eee;padding:.5em;
background:#fafafa}.tokens span{border-radius:3px;padding:1px 0}
.legend span{padding:1px 6px;margin-right:6px;border-radius:3px;font-size:.85em}
.prompt{font-weight:bold;color:#555}.dead{color:#b00;font-weight:bold}"""


def esc(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value))


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are HTML already (escaped by the caller), a cell may be a whole ``<td ...>``;
    the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(
            c if c.startswith("<td") else f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def figure(uri: str, alt: str) -> str:
    """An embedded image (a data URI) in a figure."""
    return f'<figure><img alt="{esc(alt)}" src="{uri}"/></figure>'


def page(title: str, heading: str, body: str, subtitle: str = "") -> str:
    """A whole page: ``body`` (HTML) under an ``h1`` and a line saying what wrote it and when."""
    stamp = f"{subtitle + ' &middot; ' if subtitle else ''}written {esc(now_iso())} by moekit {esc(__version__)}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<style>{_STYLE}</style></head><body><h1>{esc(heading)}</h1><p class="small">{stamp}</p>{body}</body></html>'
    )


def write_page(path: Path, text: str) -> Path:
    """Write a page atomically (temp file + rename); return its path."""
    write_text_atomic(Path(path), text)
    return Path(path)
