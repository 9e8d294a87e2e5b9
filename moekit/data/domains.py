"""A domain's data as train and held-out block views, with its held-out split recorded once.

``domain_data`` is what train, tune, eval (of a run) and the seed pretraining call: it prepares
(or finds in the cache) a token store per data spec, and returns the training blocks and the
held-out blocks. The split is a token position (see ``moekit.data.blocks``); a run records it in
its manifest (:class:`HeldoutRecord`) the first time a domain is split, and every later command
reuses that record, so no command can evaluate on tokens another one trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moekit.data.blocks import BlockView, MixtureBlocks, TokenSequence, heldout_start
from moekit.data.store import cached_store, store_key
from moekit.errors import DataError
from moekit.manifest import HeldoutRecord

DEFAULT_VAL_FRACTION = 0.05


@dataclass
class DomainData:
    """A domain's training blocks, held-out blocks and the record of its split."""

    name: str
    train: BlockView
    heldout: BlockView
    record: HeldoutRecord


def token_sequence(
    tokenizer: Any,
    specs: list[str],
    text_field: str,
    cache_dir: Path,
    workers: int | None = None,
    created: list[Path] | None = None,
) -> TokenSequence:
    """The stores of ``specs`` (prepared now where missing; their paths appended to ``created``) as one token
    sequence."""
    stores = []
    for spec in specs:
        before = (Path(cache_dir) / store_key(tokenizer, spec, text_field)).exists()
        stores.append(cached_store(tokenizer, spec, text_field, cache_dir, workers))
        if not before and created is not None:
            created.append(stores[-1].path)
    return TokenSequence(stores)


def _split(
    name: str, sequence: TokenSequence, val_fraction: float | None, recorded: HeldoutRecord | None
) -> HeldoutRecord:
    """The domain's split: the recorded one when it is for the same data, else a new one."""
    if recorded is not None and recorded.data_key == sequence.key and recorded.val_key is None:
        if (
            val_fraction is not None
            and recorded.val_fraction is not None
            and abs(val_fraction - recorded.val_fraction) > 1e-12
        ):
            raise DataError(
                f"The held-out split of '{name}' was recorded with val_fraction {recorded.val_fraction} (in "
                "moekit.yaml); "
                f"this command asks for {val_fraction}. Another split would evaluate on tokens that were trained on.",
                "Leave --val-fraction out (or give the recorded value) to use the recorded split.",
            )
        return recorded
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    return HeldoutRecord(
        data_key=sequence.key,
        tokens=sequence.num_tokens,
        start=heldout_start(sequence, fraction),
        val_fraction=fraction,
    )


def domain_data(
    tokenizer: Any,
    name: str,
    specs: list[str],
    val_specs: list[str],
    seq_len: int,
    val_fraction: float | None,
    text_field: str,
    cache_dir: Path,
    recorded: HeldoutRecord | None = None,
    workers: int | None = None,
    created: list[Path] | None = None,
) -> DomainData:
    """Training and held-out blocks of one domain; DataError when either cannot hold a block.

    ``val_fraction`` None means: the recorded split, else the default (0.05). A held-out tail
    shorter than one block is refused (the loop evaluates whole blocks); ``val_fraction`` 0 holds
    nothing out.
    """
    sequence = token_sequence(tokenizer, specs, text_field, cache_dir, workers, created)
    shown = ", ".join(specs)
    if val_specs:
        held = token_sequence(tokenizer, val_specs, text_field, cache_dir, workers, created)
        record = HeldoutRecord(data_key=sequence.key, tokens=sequence.num_tokens, val_key=held.key)
        train, heldout = (
            BlockView(sequence, 0, sequence.num_tokens, seq_len),
            BlockView(held, 0, held.num_tokens, seq_len),
        )
        if len(heldout) == 0:
            raise DataError(
                f"Validation data {', '.join(val_specs)} has {held.num_tokens} tokens, fewer than one block of "
                f"{seq_len}.",
                "Add validation data or lower --seq-len.",
            )
    else:
        record = _split(name, sequence, val_fraction, recorded)
        assert record.start is not None
        train = BlockView(sequence, 0, record.start, seq_len)
        heldout = BlockView(sequence, record.start, sequence.num_tokens, seq_len)
        if record.start < sequence.num_tokens and len(heldout) == 0:
            raise DataError(
                f"Data {shown}: its held-out tail (val_fraction {record.val_fraction}: "
                f"{sequence.num_tokens - record.start} tokens) "
                f"is shorter than one block of {seq_len}.",
                "Add data, lower --seq-len, pass --val-data, or use --val-fraction 0.",
            )
    if len(train) == 0:
        raise DataError(
            f"Data {shown} has {train.stop - train.start} tokens to train on, fewer than one block of {seq_len}.",
            "Add data or lower --seq-len.",
        )
    return DomainData(name, train, heldout, record)


def recorded_heldout(
    tokenizer: Any,
    name: str,
    specs: list[str],
    val_specs: list[str],
    record: HeldoutRecord | None,
    seq_len: int,
    text_field: str,
    cache_dir: Path,
) -> BlockView:
    """The held-out blocks of a run's domain from its recorded split (``eval RUN_DIR``); never a new split.

    A held-out range shorter than ``seq_len`` gives one shorter block.
    """
    if record is None:
        raise DataError(
            f"The run has no recorded held-out split for '{name}': it was never trained by this moekit.",
            "Train the branch (moekit train), or evaluate on given files with --data DOMAIN=PATH.",
        )
    sequence = token_sequence(tokenizer, val_specs or specs, text_field, cache_dir)
    if (record.val_key or record.data_key) != sequence.key:
        raise DataError(
            f"The data of '{name}' changed since its held-out split was recorded.",
            "Train the branch again on its data, or evaluate on given files with --data DOMAIN=PATH.",
        )
    start = 0 if record.val_key else record.start
    assert start is not None
    length = sequence.num_tokens - start
    return BlockView(sequence, start, sequence.num_tokens, min(seq_len, max(1, length)))


def branch_record_for(manifest: Any, name: str, specs: list[str], val_specs: list[str]) -> Any:
    """The run branch whose registered data is exactly ``specs``/``val_specs`` (its split applies), or None."""
    if manifest is None or name not in manifest.branches:
        return None
    branch = manifest.branches[name]
    return branch if branch.data == specs and branch.val_data == val_specs else None


def domains_data(
    tokenizer: Any,
    data: dict[str, list[str]],
    val_data: dict[str, list[str]],
    seq_len: int,
    val_fraction: float | None,
    text_field: str,
    cache_dir: Path,
    manifest: Any = None,
    workers: int | None = None,
) -> dict[str, DomainData]:
    """:func:`domain_data` for every domain; a run's branch domains use (or start) their recorded split.

    Every domain is prepared and checked before anything is returned, so a refusal records
    nothing, and the stores it prepared for the refused call are removed again.
    """
    import shutil

    created: list[Path] = []
    made_cache = not Path(cache_dir).exists()
    result = {}
    try:
        for name, specs in data.items():
            branch = branch_record_for(manifest, name, specs, val_data.get(name, []))
            recorded = branch.heldout if branch is not None else None
            result[name] = domain_data(
                tokenizer,
                name,
                specs,
                val_data.get(name, []),
                seq_len,
                val_fraction,
                text_field,
                cache_dir,
                recorded,
                workers,
                created,
            )
    except DataError:
        for path in created:  # only what this call prepared: other jobs may share the cache
            shutil.rmtree(path, ignore_errors=True)
        if made_cache and Path(cache_dir).is_dir() and not any(Path(cache_dir).iterdir()):
            Path(cache_dir).rmdir()
        raise
    return result


def training_mixture(domains: dict[str, DomainData], shares: dict[str, float] | None, seed: int) -> MixtureBlocks:
    """The domains' training blocks, sampled by ``shares`` (domain -> share; equal shares when None)."""
    return MixtureBlocks({d: domain.train for d, domain in domains.items()}, shares or {d: 1.0 for d in domains}, seed)


def heldout_sets(domains: dict[str, DomainData], blocks: int) -> dict[str, Any]:
    """The first ``blocks`` held-out blocks of every domain that has any: the training loop's evaluation sets."""
    return {d: domain.heldout.head(blocks) for d, domain in domains.items() if len(domain.heldout)}


def record_heldout(run_dir: Path, domains: dict[str, DomainData]) -> None:
    """Record each branch domain's split in the run manifest (where it is new or changed)."""
    from moekit.manifest import updating_manifest

    with updating_manifest(run_dir) as manifest:
        for name, domain in domains.items():
            branch = manifest.branches.get(name)
            if branch is not None and branch.heldout != domain.record:
                branch.heldout = domain.record
