"""Opening, checking and describing the inputs of ``mix`` before any weight is read.

All checks run on configs and safetensors headers only, so a mismatch in the last shard of the
last branch is reported in a second, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moekit.arch import ArchAdapter
from moekit.config import MixConfig
from moekit.data.sources import spec_paths
from moekit.errors import IncompatibleModelsError, InvalidOptionError, UnsupportedArchitectureError
from moekit.io.checkpoint import Checkpoint
from moekit.io.config_json import with_rope_parameters
from moekit.io.files import tokenizer_fingerprint
from moekit.io.outputs import guard_output
from moekit.io.source import resolve_model_dir
from moekit.models import open_dense_model
from moekit.steps.mix.merge import MergeSpec

# Config keys that may differ between a seed and its trained branches without changing the
# architecture (bookkeeping written by save_pretrained or trainers).
_NON_STRUCTURAL_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"}


@dataclass(frozen=True)
class ExpertSource:
    """Where one expert's FFN comes from."""

    name: str
    checkpoint: Checkpoint
    kind: Literal["branch", "seed", "upcycle"]


@dataclass(frozen=True)
class MixInputs:
    """Validated inputs: the seed, the experts in output order, and the averaging weights."""

    seed: Checkpoint
    adapter: ArchAdapter
    experts: list[ExpertSource]
    average: list[tuple[Checkpoint, float]]
    merge: MergeSpec = MergeSpec()

    def close(self) -> None:
        """Close every input's open shard files."""
        for checkpoint in [self.seed, *(e.checkpoint for e in self.experts)]:
            checkpoint.close()


def experts_from_run_dir(run_dir: Path) -> tuple[str, list[tuple[str, Path]]]:
    """The seed directory and the (name, directory) of every branch of a run directory."""
    from moekit.manifest import load_manifest

    manifest = load_manifest(run_dir)
    return manifest.seed.path, [(name, manifest.branch_dir(run_dir, name)) for name in manifest.branches]


def mix_sources(
    run_dir: Path | None,
    experts: list[tuple[str, Path]],
    upcycle: str | None,
    seed_model: str | None,
    seed_as: str,
    out: Path | None,
) -> tuple[str, list[tuple[str, Path]], Path]:
    """(seed, experts, output directory) for the three ways to name mix's inputs.

    A run directory (its seed and branches; output RUN_DIR/mixed by default), ``--upcycle SEED``, or
    ``--expert DIR``s (their seed given by ``--seed-model``; without it, the first expert, which
    only serves when the seed's FFN takes no part: ``--seed-as none``).
    """
    if sum(x is not None and x != [] for x in (run_dir, experts or None, upcycle)) != 1:
        raise InvalidOptionError(
            "Give exactly one input: RUN_DIR, --expert DIR ..., or --upcycle SEED.", "See moekit mix --help."
        )
    if run_dir is not None:
        seed, experts = experts_from_run_dir(run_dir)
        out = out or run_dir / "mixed"
    elif upcycle is not None:
        seed = upcycle
    else:
        if seed_model is None and seed_as != "none":
            raise InvalidOptionError(
                f"--expert mode with --seed-as {seed_as} needs --seed-model SEED.",
                "Pass --seed-model, or --seed-as none.",
            )
        seed = seed_model or str(experts[0][1])
    if out is None:
        raise InvalidOptionError("No output directory.", "Pass --out DIR.")
    return seed, experts, out


def normalised_config(model_dir: Path) -> dict:
    """config.json as transformers reads it (legacy keys such as rope_theta folded into
    rope_parameters, defaults filled in), so a seed and a branch re-saved by a newer
    transformers compare equal when their architecture is the same."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).to_dict()


def _configs_differ(seed: Checkpoint, branch: Checkpoint) -> tuple[list[str], dict, dict]:
    """Architecture keys in which a branch's config differs from the seed's.

    First on the JSON itself (legacy rope keys folded): equal configs, the usual case, need no
    transformers import. Only configs that differ there are compared again as transformers reads
    them, so that a legacy seed and its branches re-saved by transformers 5 still match.
    """
    raw_seed, raw_branch = with_rope_parameters(seed.config), with_rope_parameters(branch.config)
    if not _config_differences(raw_seed, raw_branch):
        return [], raw_seed, raw_branch
    full_seed, full_branch = normalised_config(seed.path), normalised_config(branch.path)
    return _config_differences(full_seed, full_branch), full_seed, full_branch


def _config_differences(reference: dict, other: dict) -> list[str]:
    keys = (set(reference) | set(other)) - _NON_STRUCTURAL_KEYS
    return sorted(k for k in keys if reference.get(k) != other.get(k))


# The LM head a tied model shares with its input embedding (the same name in every supported family).
TIED_HEAD = "lm_head.weight"


def redundant_tied_copies(config: dict, tensors: dict) -> set[str]:
    """Stored tensors that a tied model ignores on load: an ``lm_head.weight`` saved next to a tied embedding.

    moekit up to 0.1 wrote one into bf16 branches of tied seeds; mix reads the embedding only, so
    such branches still mix (and the output is tied, as the seed).
    """
    return {TIED_HEAD} if config.get("tie_word_embeddings") and TIED_HEAD in tensors else set()


def check_compatible(seed: Checkpoint, branches: list[tuple[str, Checkpoint]]) -> None:
    """Raise IncompatibleModelsError unless every branch matches the seed's architecture exactly."""
    seed_tokenizer = tokenizer_fingerprint(seed.path)
    for name, branch in branches:
        where = f"Branch '{name}' ({branch.path})"
        fix = "All branches must be trained copies of the same seed (moekit branch makes them)."
        if branch.model_type != seed.model_type:
            raise IncompatibleModelsError(
                f"{where} is a {branch.model_type} model but the seed is {seed.model_type}.", fix
            )
        diffs, seed_config, branch_config = _configs_differ(seed, branch)
        if diffs:
            shown = ", ".join(f"{k}: {seed_config.get(k)!r} vs {branch_config.get(k)!r}" for k in diffs[:4])
            raise IncompatibleModelsError(f"{where} differs from the seed in config.json ({shown}).", fix)
        missing = sorted(
            (set(seed.tensors) ^ set(branch.tensors)) - redundant_tied_copies(branch_config, branch.tensors)
        )
        if missing:
            raise IncompatibleModelsError(f"{where} and the seed have different tensors (e.g. {missing[0]}).", fix)
        for tensor, info in seed.tensors.items():
            if branch.tensors[tensor].shape != info.shape:
                raise IncompatibleModelsError(
                    f"{where}: tensor {tensor} has shape {branch.tensors[tensor].shape}, the seed's is {info.shape}.",
                    fix,
                )
        if tokenizer_fingerprint(branch.path) != seed_tokenizer:
            raise IncompatibleModelsError(
                f"{where} has a different tokenizer than the seed; token ids would not mean the same thing.",
                "Use the seed's tokenizer files in every branch.",
            )


def _average_weights(cfg: MixConfig, count: int) -> list[float]:
    if cfg.average == "weighted":
        if cfg.weights is None or len(cfg.weights) != count:
            raise InvalidOptionError(
                f"--average weighted needs one weight per branch ({count}), got {len(cfg.weights or [])}.",
                "Write e.g. --average weighted:0.5,0.3,0.2 in branch order.",
            )
        total = sum(cfg.weights)
        return [w / total for w in cfg.weights]
    return [1.0 / count] * count


def open_mix_inputs(cfg: MixConfig) -> MixInputs:
    """Open and check the seed and branches (or the upcycling seed); decide expert order and averaging."""
    seed, adapter = _open_seed(cfg)
    check_seed_as(cfg, adapter)
    read = [seed.path, *(p for _, p in cfg.experts), *spec_paths(cfg.router_data.values())]
    guard_output(cfg.out, "model", cfg.force, read, cfg.run_dir)  # before any work
    if cfg.upcycle is not None:
        if cfg.experts:
            raise InvalidOptionError("--upcycle cannot be combined with branch experts.", "Use one or the other.")
        experts = [ExpertSource(f"expert{i}", seed, "upcycle") for i in range(cfg.upcycle.num_experts)]
        average = [(seed, 1.0)]
    else:
        if not cfg.experts:
            raise InvalidOptionError("No experts to mix.", "Pass a run directory, --expert DIR ..., or --upcycle SEED.")
        branches = [(name, open_dense_model(Path(path), target=cfg.effective_target)[0]) for name, path in cfg.experts]
        names = [n for n, _ in branches]
        if len(set(names)) != len(names) or (cfg.seed_as == "routed" and "seed" in names):
            raise InvalidOptionError(
                f"Expert names must be unique (got {', '.join(names)}).", "Name them with --expert NAME=DIR."
            )
        check_compatible(seed, branches)
        experts = [ExpertSource(n, c, "branch") for n, c in branches]
        if cfg.seed_as == "routed":
            experts.append(ExpertSource("seed", seed, "seed"))
        weights = _average_weights(cfg, len(branches))
        average = [(seed, 1.0)] if cfg.average == "seed" else [(c, w) for (_, c), w in zip(branches, weights)]
    if len(experts) < cfg.top_k:
        raise InvalidOptionError(
            f"{len(experts)} expert(s) cannot serve top-{cfg.top_k} routing.",
            f"Use --top-k {len(experts)} or less, or add experts.",
        )
    if cfg.attention_top_k > len(experts):
        raise InvalidOptionError(
            f"{len(experts)} attention expert(s) cannot serve --attention-top-k {cfg.attention_top_k}.",
            f"Use --attention-top-k {len(experts)} or less (0: soft routing over all of them).",
        )
    merge = MergeSpec(cfg.merge, cfg.merge_density, cfg.merge_scale, cfg.random_seed)
    return MixInputs(seed, adapter, experts, average, merge)


def _open_seed(cfg: MixConfig) -> tuple[Checkpoint, ArchAdapter]:
    """The seed and the adapter of its family and target; a clear error when attention experts cannot be built."""
    try:
        return open_dense_model(resolve_model_dir(cfg.seed), target=cfg.effective_target)
    except UnsupportedArchitectureError as error:
        if not cfg.attention_experts or cfg.target is not None:
            raise
        from moekit.arch.moekit_moe import ATTENTION_FAMILIES

        raise UnsupportedArchitectureError(
            f"--attention-experts cannot be built from this seed: {error.message}",
            f"Attention experts rebuild the attention of {', '.join(ATTENTION_FAMILIES)} seeds; "
            "mix this one without --attention-experts.",
        ) from error


def check_seed_as(cfg: MixConfig, adapter: ArchAdapter) -> None:
    """Refuse ``--seed-as shared`` for a target without shared experts, naming the targets that have them."""
    if cfg.seed_as != "shared" or adapter.shared is not None:
        return
    from moekit.arch import supported_targets

    with_shared = sorted({t for targets in supported_targets().values() for t in targets if _has_shared(t)})
    raise InvalidOptionError(
        f"--seed-as shared needs a target with a shared expert; {adapter.moe_type} has none.",
        f"Use --target with one of {', '.join(with_shared)} (where the seed's family allows it), or --seed-as routed.",
    )


def _has_shared(moe_type: str) -> bool:
    from moekit.arch import adapter_for_moe

    adapter = adapter_for_moe(moe_type)
    return adapter is not None and adapter.shared is not None
