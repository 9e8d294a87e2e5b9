"""moekit's data layer: reading text, the token store, blocks, splits and mixtures.

- ``sources``: data specs (files, directories, globs, ``hf:`` datasets), streamed documents;
- ``encode``: text pieces to token ids (what tokenisation workers run; no torch);
- ``tokens``: tokenizer fingerprints and small in-memory samples (eval, inspect, calibration);
- ``store``: the token store, tokenised once in parallel, read with positioned reads;
- ``blocks``: block views over stores, the held-out split position, mixtures without a pool;
- ``domains``: a domain's train and held-out blocks, with the split recorded in the run.

Names are imported lazily, so a tokenisation worker that imports ``moekit.data.encode`` does not
pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sources": (
        "HUB_PREFIX",
        "TEXT_SUFFIXES",
        "absolute_spec",
        "expand_data_paths",
        "iter_documents",
        "iter_spec_documents",
        "iter_spec_pieces",
        "parse_hub_spec",
        "spec_fingerprint",
    ),
    "tokens": (
        "evaluation_blocks",
        "load_token_blocks",
        "pack_blocks",
        "packed_blocks",
        "token_stream",
        "tokenize_documents",
    ),
    "store": ("TokenStore", "cached_store", "prepare_store", "tokenizer_fingerprint_of"),
    "blocks": ("BlockView", "MixtureBlocks", "TensorBlocks", "TokenSequence", "heldout_start"),
    "domains": ("DomainData", "domain_data", "recorded_heldout", "token_sequence"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moekit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moekit.data.{_WHERE[name]}"), name)


__all__ = sorted(_WHERE)
