"""``moekit prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moekit.commands.common import TEXT_FIELD_OPTION


def prepare_command(
    data: list[str] = typer.Argument(
        ...,
        metavar="DATA...",
        help="Text data: files (.txt/.jsonl/.json/.parquet), directories, globs or hf:NAME specs, read in order.",
    ),
    tokenizer: str = typer.Option(
        ..., "--tokenizer", help="Model (directory or hub id) whose tokenizer to use: the seed."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Store directory to write."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Tokenising processes (default: all cores)."),
    text_field: str = TEXT_FIELD_OPTION,
    force: bool = typer.Option(False, "--force", help="Replace OUT if it holds an earlier store."),
) -> None:
    """Tokenise DATA once into a memory-mappable token store (uint16/uint32 shards, document ends, metadata).

    Give the store where raw data would go: `moekit train RUN --data code=STORE`. train, tune and eval also
    prepare stores of raw data themselves (cached in RUN_DIR/.cache/tokens); prepare is for doing it once, ahead,
    on many cores.

    \b
    Example:
      moekit prepare data/code/ extra-code.jsonl --tokenizer ./seed --out stores/code
    """
    from rich.console import Console

    from moekit.progress import quiet_transformers
    from moekit.steps.prepare import prepare

    quiet_transformers()
    store = prepare(data, tokenizer, out, text_field, workers, force)
    Console().print(
        f"[green]Prepared[/] {store.path}: {store.num_tokens:,} tokens in {store.num_documents:,} documents "
        f"({store.meta['dtype']}, {len(store.meta['shards'])} shard(s)). Use it as data: --data DOMAIN={store.path}"
    )
