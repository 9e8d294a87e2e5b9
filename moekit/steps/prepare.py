"""``moekit prepare``: tokenise data once into a token store that train, tune and eval read directly."""

from __future__ import annotations

from pathlib import Path

from moekit.data.sources import absolute_spec, expand_data_paths, spec_paths
from moekit.data.store import TokenStore, prepare_store
from moekit.io.outputs import guard_output
from moekit.io.source import resolve_model_dir
from moekit.progress import progress_bar


def _text_size(specs: list[str]) -> int:
    """Characters to read (bytes of local files; 0 when unknown, e.g. hf: data)."""
    return sum(p.stat().st_size for spec in specs if not spec.startswith("hf:") for p in expand_data_paths(spec))


def prepare(
    specs: list[str],
    tokenizer_source: str,
    out: Path,
    text_field: str = "text",
    workers: int | None = None,
    force: bool = False,
    show_progress: bool = True,
) -> TokenStore:
    """Tokenise ``specs`` (in order, one token sequence) with the tokenizer of ``tokenizer_source`` into a store at
    ``out``."""
    from moekit.models import load_tokenizer

    absolute = [absolute_spec(s) for s in specs]  # clear errors for missing data before anything else
    guard_output(out, "store", force, [*spec_paths(absolute), resolve_model_dir(tokenizer_source)])
    tokenizer = load_tokenizer(resolve_model_dir(tokenizer_source))
    with progress_bar("tokenising (characters)", _text_size(absolute), show_progress) as advance:
        return prepare_store(tokenizer, absolute, out, text_field, workers, progress=advance, force=force)
